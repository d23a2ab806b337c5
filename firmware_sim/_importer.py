"""Per-board imports: each simulated board sees its own modules, as each real board has its own
interpreter.

Rules (docs/simulator.md, "Module isolation"):
- Resolution order, as MicroPython's: the board's built-in shims (``machine``, ``time``,
  ``os``, ...), then ``.py`` files on the board's flash (``/`` then ``/lib``), then the
  *isolated packages* (by default ``smartx_device``: each board loads its own copy from the
  host, so module state such as the SDK's ticks accumulator is per board), then the host's
  ordinary ``import`` for everything else (``json``, ``ssl``, ``cryptography``, ...).
- Board modules get the board's builtins (its ``open``, ``print``, ``__import__``), so the
  SDK's files land on the board's flash and its own imports resolve through this importer.
- Sources are compiled once per process (keyed by path, size and mtime) and executed once per
  boot: a reset starts from fresh modules, as a real reset does.
- A module that fails to execute is removed from the table, as CPython does.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import importlib.util
import os
import threading
import types
from typing import Any, Callable, Dict, Iterable, Optional

_CODE_CACHE: Dict[tuple, types.CodeType] = {}
_CODE_LOCK = threading.Lock()
_SPEC_CACHE: Dict[str, Optional[tuple]] = {}


def compile_file(path: str) -> types.CodeType:
    """The code object of the Python source at ``path`` (compiled once per version of it)."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    with _CODE_LOCK:
        code = _CODE_CACHE.get(key)
    if code is None:
        with open(path, "rb") as handle:
            source = handle.read()
        code = compile(source, path, "exec", dont_inherit=True)
        with _CODE_LOCK:
            _CODE_CACHE[key] = code
    return code


def _host_location(fullname: str, parent_path: Optional[list]) -> Optional[tuple]:
    """(origin file, is_package, search path) of a host module, or None (cached)."""
    cache_key = fullname if parent_path is None else fullname + "|" + "|".join(parent_path)
    if cache_key in _SPEC_CACHE:
        return _SPEC_CACHE[cache_key]
    if parent_path is None:
        # importlib's full search: it also sees editable installs' finders, not only sys.path.
        try:
            spec = importlib.util.find_spec(fullname)
        except (ImportError, ValueError):
            spec = None
    else:
        spec = importlib.machinery.PathFinder.find_spec(fullname, parent_path)
    found = None
    if spec is not None and spec.origin and spec.origin.endswith(".py"):
        search = list(spec.submodule_search_locations or []) or None
        found = (spec.origin, search is not None, search)
    _SPEC_CACHE[cache_key] = found
    return found


class BoardImporter:
    """The ``__import__`` of one boot of one board (see the module rules)."""

    def __init__(self, shims: Dict[str, types.ModuleType], flash_root: str,
                 isolated: Iterable[str] = ("smartx_device",),
                 builtins_dict: Optional[dict] = None,
                 on_load: Optional[Callable[[types.ModuleType], None]] = None) -> None:
        self.shims = dict(shims)
        self.flash_root = flash_root
        self.isolated = frozenset(isolated)
        self.builtins = builtins_dict if builtins_dict is not None else builtins.__dict__
        self.on_load = on_load
        self.modules: Dict[str, types.ModuleType] = {}
        self._lock = threading.RLock()
        self._host_import = builtins.__import__

    # -- the __import__ protocol -----------------------------------------------------------

    def __call__(self, name: str, globals: Optional[dict] = None, locals: Any = None,
                 fromlist: Any = (), level: int = 0) -> types.ModuleType:
        if level:
            fullname = self._resolve_relative(name, globals or {}, level)
        else:
            fullname = name
        top = fullname.partition(".")[0]
        if not self._is_board_module(top):
            return self._host_import(name, globals, locals, fromlist, level)
        module = self._load_chain(fullname)
        if fromlist:
            for item in fromlist:
                if item == "*" or hasattr(module, item):
                    continue
                if getattr(module, "__path__", None) is not None:
                    try:
                        self._load(fullname + "." + item)
                    except ModuleNotFoundError as exc:
                        if exc.name != fullname + "." + item:
                            raise
            return module
        if level:
            return module
        return self.modules.get(top) or self.shims[top]

    def _is_board_module(self, top: str) -> bool:
        if top in self.shims or top in self.modules or top in self.isolated:
            return True
        return self._flash_file(top, None) is not None

    def _resolve_relative(self, name: str, globals: dict, level: int) -> str:
        package = globals.get("__package__")
        if package is None:
            module_name = globals.get("__name__", "")
            package = module_name if "__path__" in globals else module_name.rpartition(".")[0]
        if not package:
            raise ImportError("attempted relative import with no known parent package")
        parts = package.split(".")
        if level - 1 > len(parts) - 1:
            raise ImportError("attempted relative import beyond top-level package")
        base = ".".join(parts[:len(parts) - (level - 1)])
        return base + "." + name if name else base

    # -- loading ---------------------------------------------------------------------------

    def _load_chain(self, fullname: str) -> types.ModuleType:
        """Load every package along ``fullname`` and the module itself; return the module."""
        parts = fullname.split(".")
        module = None
        for index in range(1, len(parts) + 1):
            module = self._load(".".join(parts[:index]))
        assert module is not None
        return module

    def _load(self, fullname: str) -> types.ModuleType:
        with self._lock:
            module = self.modules.get(fullname)
            if module is not None:
                return module
            top, _, _ = fullname.partition(".")
            if fullname in self.shims:
                return self.shims[fullname]
            if top in self.shims:
                raise ModuleNotFoundError("no module named '%s'" % fullname, name=fullname)
            parent = None
            parent_path = None
            if "." in fullname:
                parent = self._load(fullname.rpartition(".")[0])
                parent_path = getattr(parent, "__path__", None)
                if parent_path is None:
                    raise ModuleNotFoundError("no module named '%s'; '%s' is not a package"
                                              % (fullname, parent.__name__), name=fullname)
            location = self._locate(fullname, top, parent_path)
            if location is None:
                raise ModuleNotFoundError("no module named '%s'" % fullname, name=fullname)
            origin, is_package, search = location
            module = types.ModuleType(fullname)
            module.__file__ = origin
            module.__builtins__ = self.builtins  # type: ignore[attr-defined]
            module.__loader__ = None
            if is_package:
                module.__path__ = search  # type: ignore[attr-defined]
                module.__package__ = fullname
            else:
                module.__package__ = fullname.rpartition(".")[0]
            module.__spec__ = importlib.util.spec_from_file_location(
                fullname, origin, submodule_search_locations=search if is_package else None)
            self.modules[fullname] = module
            try:
                exec(compile_file(origin), module.__dict__)
            except BaseException:
                self.modules.pop(fullname, None)
                raise
            if parent is not None:
                setattr(parent, fullname.rpartition(".")[2], module)
            if self.on_load is not None:
                self.on_load(module)
            return module

    def _locate(self, fullname: str, top: str, parent_path: Optional[list]) -> Optional[tuple]:
        if parent_path is None:
            found = self._flash_file(fullname, None)
            if found is not None:
                return found
            if top in self.isolated:
                return _host_location(fullname, None)
            return None
        name = fullname.rpartition(".")[2]
        for folder in parent_path:
            candidate = os.path.join(folder, name, "__init__.py")
            if os.path.isfile(candidate):
                return (candidate, True, [os.path.join(folder, name)])
            candidate = os.path.join(folder, name + ".py")
            if os.path.isfile(candidate):
                return (candidate, False, None)
        return None

    def _flash_file(self, top: str, _unused: Any) -> Optional[tuple]:
        """A top-level module on the flash (``/NAME.py``, ``/NAME/``, or the same in /lib)."""
        for folder in (self.flash_root, os.path.join(self.flash_root, "lib")):
            package = os.path.join(folder, top, "__init__.py")
            if os.path.isfile(package):
                return (package, True, [os.path.join(folder, top)])
            single = os.path.join(folder, top + ".py")
            if os.path.isfile(single):
                return (single, False, None)
        return None
