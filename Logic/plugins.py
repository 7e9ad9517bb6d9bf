"""The installed task plugins: a folder of plugins (``*.anymc3d`` files or plugin folders) that can be listed,
imported and removed.

Listing reads each plugin's ``plugin.json`` with ``anymc3d.plugin_file`` (standard library only: no torch, no
child process), so opening the module is quick and works before the backend's dependencies are installed.
"""

import os
import shutil

from anymc3d.plugin_file import (
    PLUGIN_SUFFIX,
    find_plugins,
    is_plugin_path,
    read_plugin_json,
)


class PluginInfo:
    """What the module shows of one plugin: name, task, labels, backbone (read from the plugin's metadata)."""

    def __init__(self, path, metadata):
        self.path = os.path.abspath(path)
        self.metadata = dict(metadata)
        stem = os.path.basename(self.path)[: -len(PLUGIN_SUFFIX)] if self.path.endswith(PLUGIN_SUFFIX) else os.path.basename(self.path)
        self.name = str(metadata.get("name") or stem)
        self.task = str(metadata.get("task") or "")
        self.labels = [str(label) for label in metadata.get("labels") or []]
        self.backbone = _backboneName(metadata)
        self.views = _views(metadata)

    def description(self):
        labels = ", ".join(self.labels)
        return f"{self.name} ({self.task}; backbone {self.backbone or '?'}): {labels}"

    def __repr__(self):
        return f"PluginInfo({self.name!r}, {self.path!r})"


def _backboneName(metadata):
    backbone = metadata.get("backbone")
    if isinstance(backbone, dict):
        return str(backbone.get("name") or backbone.get("architecture") or "")
    return str(backbone or metadata.get("backbone_name") or "")


def _views(metadata):
    views = metadata.get("views")
    if isinstance(views, list) and views:
        return [str(v) for v in views]
    return []


class PluginLibrary:
    """The plugins folder (configurable). ``metadataReader(path) -> dict`` reads one plugin's metadata; default
    ``anymc3d.plugin_file.read_plugin_json`` (schema-checked, torch-free)."""

    def __init__(self, folder, metadataReader=None):
        self.folder = os.path.abspath(folder)
        self.metadataReader = metadataReader or read_plugin_json
        self._cache = {}

    def pluginPaths(self):
        """Finished plugins of the folder (a plugin being written, a hidden or ``.partial`` entry, is skipped)."""
        if not os.path.isdir(self.folder):
            return []
        return [str(path) for path in find_plugins(self.folder)]

    def plugins(self):
        """Return (plugins, problems): the readable plugins and a list of (path, message) for unreadable ones."""
        plugins, problems = [], []
        for path in self.pluginPaths():
            try:
                plugins.append(self.plugin(path))
            except Exception as error:  # noqa: BLE001 - one bad plugin must not hide the others
                problems.append((path, str(error)))
        return plugins, problems

    def plugin(self, path):
        key = (os.path.abspath(path), os.path.getmtime(path))
        if key not in self._cache:
            self._cache[key] = PluginInfo(path, self.metadataReader(path))
        return self._cache[key]

    def importPlugin(self, sourcePath, overwrite=False):
        """Copy a plugin (file or folder) into the folder after checking that its metadata can be read."""
        sourcePath = os.path.abspath(sourcePath)
        if not is_plugin_path(sourcePath):
            raise ValueError(f"Not a plugin (a {PLUGIN_SUFFIX} file or a folder holding plugin.json): {sourcePath}")
        metadata = self.metadataReader(sourcePath)  # raises on a bad plugin: nothing copied
        PluginInfo(sourcePath, metadata)
        os.makedirs(self.folder, exist_ok=True)
        destination = os.path.join(self.folder, os.path.basename(sourcePath))
        if os.path.exists(destination):
            if not overwrite:
                raise FileExistsError(f"A plugin with this file name is already installed: {destination}")
            self.removePlugin(destination)
        if os.path.isdir(sourcePath):
            shutil.copytree(sourcePath, destination)
        else:
            shutil.copy2(sourcePath, destination)
        info = PluginInfo(destination, metadata)
        self._cache[(destination, os.path.getmtime(destination))] = info
        return info

    def removePlugin(self, path):
        path = os.path.abspath(path)
        if os.path.dirname(path) != self.folder or not is_plugin_path(path):
            raise ValueError(f"Not a plugin of {self.folder}: {path}")
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        self._cache = {key: info for key, info in self._cache.items() if key[0] != path}
