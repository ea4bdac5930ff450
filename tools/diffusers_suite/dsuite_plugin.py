"""pytest plugin: run diffusers' own model tests with every diffusers model wrapped by offload_tensor.

Loaded with `-p dsuite_plugin` (run.sh puts this folder on PYTHONPATH). Settings come from the
environment, so xdist workers see the same ones:

  DSUITE_MODE     plain | sync | disk   (plain: no wrapping; the plugin only logs model builds)
  DSUITE_OUT      folder for events-<worker>.jsonl (one JSON object a line) and the disk tier
  DSUITE_TEST_TIMEOUT  seconds per test (setup+call+teardown) before the process is ended with a
                  stack dump (0: none)
  DSUITE_UNSKIP_ACCEL  regex; tests whose node id matches it ignore the
                  "test requires a hardware accelerator" / "accelerator+PyTorch" skips and run on the
                  CPU (the accel-cpu suite). Unset: nothing is unskipped.
  DSUITE_ONLY_UNSKIPPED=1  deselect every test that has no such skip (so the accel-cpu suite runs
                  exactly the tests that the core suite skips for want of an accelerator)

Hook point (why): a model is wrapped when it is complete, at the first moment it exists with its
weights, so that everything a test does with it afterwards (`.to()`, `.eval()`, forward,
`save_pretrained`, `load_state_dict`, adapters, compile, ...) runs on the wrapped model:

* built directly (`self.model_class(**init_dict)`, `from_config`): each ModelMixin subclass's own
  `__init__` is wrapped (classes that exist when the plugin loads, and later ones through
  `ModelMixin.__init_subclass__`); the outermost `__init__` of a construction wraps the model when
  it returns (a ModelMixin built inside another's `__init__` is part of the outer model).
* loaded (`ModelMixin.from_pretrained`, including TorchAoConfig/QuantoConfig loads, and
  `from_single_file`): construction inside them is not wrapped (the model is on the meta device
  or not loaded yet, and quantizers replace modules/weights after it); the model they return is
  wrapped, after quantization and loading are complete.

Rejected alternatives: patching `.to()`/`.eval()` misses models a test never moves (the save/load,
config, num_parameters and memory-footprint tests, and every quantized-model test that calls
neither); a forward pre-hook wraps too late for the same tests and, under torch.compile, would
wrap inside a traced region.

A model that cannot be wrapped at the hook point is left alone and logged with the reason: weights
on the meta device, already wrapped (or part of a wrapped model), no parameters, or
wrap_model_for_offload raising (e.g. accelerate hooks from device_map, bitsandbytes/GGUF weights).

After each test (after its fixtures are torn down) every live ModelMixin that is still wrapped is
unwrapped with `unwrap_model`; an exception, or a parameter still an OffloadedTensor afterwards,
is logged as "unwrap_failed".
"""

from __future__ import annotations

import functools
import gc
import json
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import weakref

import pytest

MODE = os.environ.get("DSUITE_MODE", "plain")
if MODE not in ("plain", "sync", "disk"):
    raise RuntimeError(f"DSUITE_MODE must be plain, sync or disk, not {MODE!r}")
OUT = os.environ.get("DSUITE_OUT") or tempfile.mkdtemp(prefix="dsuite-")
UNSKIP = os.environ.get("DSUITE_UNSKIP_ACCEL") or None
ACCEL_SKIP_REASONS = ("test requires a hardware accelerator", "test requires accelerator+PyTorch")

_tls = threading.local()
_current = {"nodeid": "<collection>"}
_tracked: list = []  # weakrefs to models wrapped by the plugin
_events_file = None
_disk_root = None
_counter = [0]
_wrapped_since_pass = [False]  # the gc scan in _unwrap_all only runs after a test that wrapped something


def _depth(name):
    return getattr(_tls, name, 0)


def _bump(name, d):
    setattr(_tls, name, _depth(name) + d)


def _log(kind, **fields):
    global _events_file
    if _events_file is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        os.makedirs(OUT, exist_ok=True)
        _events_file = open(os.path.join(OUT, f"events-{worker}.jsonl"), "a", buffering=1)
    rec = {"kind": kind, "mode": MODE, "nodeid": _current["nodeid"], **fields}
    _events_file.write(json.dumps(rec, default=str) + "\n")


def _exc_info(exc):
    """Type, first line, the innermost offload_tensor/compile_rules frame, and a trimmed traceback."""
    tb = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in tb if "/offload_tensor/" in f.filename or "/compile_rules/" in f.filename]
    inner = ours[-1] if ours else None
    msg = str(exc).strip().splitlines()
    return {
        "exc_type": type(exc).__name__,
        "exc_msg": (msg[0] if msg else "")[:500],
        "ot_frame": f"{inner.filename}:{inner.lineno} in {inner.name}" if inner else None,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:],
    }


# -- wrapping ---------------------------------------------------------------------------------


def _wrap(model, how):
    import torch

    from offload_tensor import OffloadedTensor, SynchronousEngine, is_wrapped, wrap_model_for_offload

    cls = type(model).__name__
    try:
        params = list(model.parameters())
    except Exception as exc:
        _log("wrap_skipped", cls=cls, how=how, reason="parameters() raised", **_exc_info(exc))
        return
    if is_wrapped(model) or any(isinstance(p, OffloadedTensor) for p in params):
        _log("wrap_skipped", cls=cls, how=how, reason="already wrapped")
        return
    if not params:
        _log("wrap_skipped", cls=cls, how=how, reason="no parameters")
        return
    if any(p.device.type == "meta" for p in params):
        _log("wrap_skipped", cls=cls, how=how, reason="meta weights")
        return
    if MODE == "sync":
        kwargs = dict(device="cpu", engine=SynchronousEngine())
    else:
        global _disk_root
        if _disk_root is None:
            _disk_root = tempfile.mkdtemp(prefix=f"disk-{os.getpid()}-", dir=OUT)
        _counter[0] += 1
        kwargs = dict(device="cpu", offload="disk", disk_path=os.path.join(_disk_root, str(_counter[0])))
    try:
        with torch.inference_mode(False):
            wrap_model_for_offload(model, **kwargs)
    except Exception as exc:
        _log("wrap_refused", cls=cls, how=how, **_exc_info(exc))
        return
    wrapped = [p for p in model.parameters() if isinstance(p, OffloadedTensor)]
    unfetched = [n for n, p in model.named_parameters() if isinstance(p, OffloadedTensor) and p._key is None]
    plain = [n for n, p in model.named_parameters() if not isinstance(p, OffloadedTensor)]
    _tracked.append(weakref.ref(model))
    _wrapped_since_pass[0] = True
    _log(
        "wrapped",
        cls=cls,
        how=how,
        n_params=len(wrapped),
        not_fetched=unfetched[:5],
        n_not_fetched=len(unfetched),
        left_plain=plain[:5],
        n_left_plain=len(plain),
    )


def _patch_init(cls):
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_dsuite", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _bump("init", 1)
        try:
            init(self, *args, **kwargs)
        finally:
            _bump("init", -1)
        if _depth("init") == 0 and _depth("load") == 0:
            if MODE == "plain":
                _log("built", cls=type(self).__name__, how="init")
            else:
                _wrap(self, "init")

    __init__._dsuite = True
    cls.__init__ = __init__


def _patch_loader(owner, name):
    raw = owner.__dict__.get(name)
    if raw is None or getattr(raw, "_dsuite", False):
        return
    func = raw.__func__

    @functools.wraps(func)
    def loader(cls, *args, **kwargs):
        _bump("load", 1)
        try:
            result = func(cls, *args, **kwargs)
        finally:
            _bump("load", -1)
        if _depth("load") == 0 and _depth("init") == 0:
            model = result[0] if isinstance(result, tuple) else result
            from diffusers.models.modeling_utils import ModelMixin

            if isinstance(model, ModelMixin):
                if MODE == "plain":
                    _log("built", cls=type(model).__name__, how=name)
                else:
                    _wrap(model, name)
        return result

    new = classmethod(loader)
    new._dsuite = True
    setattr(owner, name, new)


def _all_subclasses(cls):
    seen, todo = set(), [cls]
    while todo:
        c = todo.pop()
        for s in c.__subclasses__():
            if s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


def _install():
    from diffusers.models.modeling_utils import ModelMixin

    if getattr(ModelMixin, "_dsuite_installed", False):
        return
    ModelMixin._dsuite_installed = True
    previous = ModelMixin.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        if previous is not None:
            previous.__func__(cls, **kwargs)
        else:
            super(ModelMixin, cls).__init_subclass__(**kwargs)
        _patch_init(cls)

    ModelMixin.__init_subclass__ = classmethod(__init_subclass__)
    for sub in _all_subclasses(ModelMixin):
        _patch_init(sub)
    _patch_loader(ModelMixin, "from_pretrained")
    try:
        from diffusers.loaders.single_file_model import FromOriginalModelMixin

        _patch_loader(FromOriginalModelMixin, "from_single_file")
    except ImportError:
        pass


# -- pytest hooks -----------------------------------------------------------------------------


def pytest_configure(config):
    _install()
    if UNSKIP:
        import _pytest.skipping as sk

        original = sk.evaluate_skip_marks
        pattern = re.compile(UNSKIP)

        def evaluate_skip_marks(item):
            if not pattern.search(item.nodeid):
                return original(item)
            saved = item.iter_markers

            def iter_markers(name=None):
                for m in saved(name=name):
                    if m.name == "skipif" and m.kwargs.get("reason") in ACCEL_SKIP_REASONS:
                        continue
                    yield m

            item.iter_markers = iter_markers
            try:
                return original(item)
            finally:
                del item.iter_markers

        sk.evaluate_skip_marks = evaluate_skip_marks
    _log("session", pid=os.getpid(), offload_tensor=_ot_path())


def _ot_path():
    try:
        import offload_tensor

        return os.path.dirname(offload_tensor.__file__)
    except Exception as exc:
        return f"import failed: {exc}"


def _accel_skip(item):
    for m in item.iter_markers(name="skipif"):
        if m.kwargs.get("reason") in ACCEL_SKIP_REASONS and (not m.args or bool(m.args[0])):
            return True
    return False


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("DSUITE_ONLY_UNSKIPPED") != "1":
        return
    pattern = re.compile(UNSKIP or "$^")
    keep, drop = [], []
    for item in items:
        (keep if pattern.search(item.nodeid) and _accel_skip(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session):
    _install()
    from diffusers.models.modeling_utils import ModelMixin

    for sub in _all_subclasses(ModelMixin):  # classes defined while the test modules were imported
        _patch_init(sub)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["nodeid"] = item.nodeid
    limit = float(os.environ.get("DSUITE_TEST_TIMEOUT", "0") or 0)
    if limit > 0:
        # A hung test (say, a deadlocked engine) dumps every thread's stack and ends the process;
        # under xdist the worker is replaced and the test reported as crashed.
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(limit, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        if limit > 0:
            import faulthandler

            faulthandler.cancel_dump_traceback_later()
        _current["nodeid"] = "<between tests>"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if MODE == "plain":
        return
    _unwrap_all(item)


def _unwrap_all(item):
    from diffusers.models.modeling_utils import ModelMixin

    from offload_tensor import OffloadedTensor, is_wrapped, unwrap_model

    t0 = time.perf_counter()
    live = {}
    for ref in _tracked:
        m = ref()
        if m is not None:
            live[id(m)] = m
    _tracked.clear()
    scan = _wrapped_since_pass[0]
    _wrapped_since_pass[0] = False
    # Copies the plugin never saw (deepcopy of a wrapped model, ...): every live ModelMixin. Such a
    # copy can only come from a model wrapped since the last pass.
    for obj in gc.get_objects() if scan else ():
        try:
            if issubclass(type(obj), ModelMixin) and id(obj) not in live:
                if is_wrapped(obj) or any(isinstance(p, OffloadedTensor) for p in obj._parameters.values()):
                    live[id(obj)] = obj
        except Exception:
            pass
    # Unwrap roots only: a wrapped model inside another one is unwrapped with it.
    for m in list(live.values()):
        if not is_wrapped(m):
            if any(isinstance(p, OffloadedTensor) for p in m.parameters()):
                inside = any(is_wrapped(o) and any(x is m for x in o.modules()) for o in live.values() if o is not m)
                if not inside:
                    _log("unwrap_failed", cls=type(m).__name__, exc_type="NotWrappedButOffloaded",
                         exc_msg="model holds OffloadedTensor parameters but is_wrapped() is False "
                         "(e.g. a copy or a module taken out of a wrapped model)", ot_frame=None, traceback="")
            continue
        try:
            unwrap_model(m)
        except Exception as exc:
            _log("unwrap_failed", cls=type(m).__name__, **_exc_info(exc))
            continue
        left = [n for n, p in m.named_parameters() if isinstance(p, OffloadedTensor)]
        if left:
            _log("unwrap_failed", cls=type(m).__name__, exc_type="LeftOffloaded",
                 exc_msg=f"{len(left)} parameters still OffloadedTensor after unwrap_model: {left[:3]}",
                 ot_frame=None, traceback="")
        else:
            _log("unwrapped", cls=type(m).__name__)
    _log("unwrap_pass", seconds=round(time.perf_counter() - t0, 3), n=len(live))


def pytest_sessionfinish(session, exitstatus):
    if _events_file is not None:
        _events_file.flush()
    if _disk_root and os.environ.get("DSUITE_KEEP_DISK") != "1":
        shutil.rmtree(_disk_root, ignore_errors=True)
