"""Stand-in for the Slicer launcher (CTKAppLauncher v0.1.33 running the Slicer application) as ctest runs a test
registered by ``slicer_add_python_unittest`` (Slicer v5.10.0 a2b6d08, CMake/SlicerMacroPythonTesting.cmake):

    Slicer --no-splash --testing [SLICER_ARGS] --additional-module-paths DIR... --python-code "CODE"

As the launcher, it sets the environment first (the Slicer-like Python's stand-ins and the additional module paths
on PYTHONPATH, as Slicer puts module folders on its path) and then replaces itself with the application: this
same script, run again. That one starts the Slicer-like Python (slicer-core + Testing/slicer_standins), loads each
scripted module found in the additional module paths as the module factory does (the module class built with a
parent whose ``path`` is the file, ``startupCompleted()`` emitted), then runs CODE with ``slicer.testing``
(Base/Python/slicer/testing.py: ``runUnitTest(path, testname)`` loads the tests of module ``testname`` with
unittest, runs them, and exits with EXIT_FAILURE when they were not successful; skipped tests are success). Its
``path`` argument is already importable here (the module paths), so it is not added again.
"""

import os
import sys
import types
import unittest

STANDINS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slicer_standins")


def parse(argv):
    modulePaths, code, index = [], None, 0
    while index < len(argv):
        argument = argv[index]
        if argument in ("--additional-module-paths", "--additional-module-path"):
            index += 1
            while index < len(argv) and not argv[index].startswith("--"):
                modulePaths.append(argv[index])
                index += 1
            continue
        if argument == "--python-code":
            code = argv[index + 1]
            index += 1
        index += 1
    return modulePaths, code


def runUnitTest(path, testname):
    suite = unittest.TestLoader().loadTestsFromName(testname)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    if not result.wasSuccessful():
        sys.exit(1)


def main():
    modulePaths, code = parse(sys.argv[1:])
    if os.environ.get("ANYMC3D_STANDIN_LAUNCHED") != "1":  # the launcher: environment, then the application
        env = dict(os.environ, ANYMC3D_STANDIN_LAUNCHED="1")
        env["PYTHONPATH"] = os.pathsep.join([*modulePaths, STANDINS, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)])
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    import slicer_app

    app = slicer_app.install()
    import slicer

    slicer.testing = types.ModuleType("slicer.testing")
    slicer.testing.runUnitTest = runUnitTest
    sys.modules["slicer.testing"] = slicer.testing
    for folder in modulePaths:
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(".py"):
                module = __import__(name[:-3])
                moduleClass = getattr(module, name[:-3], None)
                if isinstance(moduleClass, type):
                    moduleClass(slicer_app.ModulePanel(path=os.path.join(folder, name)))
    for signature, handler in app.connections:
        if signature == "startupCompleted()":
            handler()
    exec(compile(code.replace("\\;", ";"), "<python-code>", "exec"), {"__name__": "__main__"})  # noqa: S102
    sys.stdout.flush()
    os._exit(0)  # skip VTK's slow teardown


if __name__ == "__main__":
    main()
