"""Stand-in for PythonQt's ``ctk`` module (commontk/CTK 868d56c Libs/Widgets): the CTK widgets the module makes from
Python. The classes are the ``qt`` stand-in's, which the .ui loader also builds."""

from qt import ctkCollapsibleButton

__all__ = ["ctkCollapsibleButton"]
