"""A pytest plugin that runs diffusers' own fast pipeline tests offline, optionally with tokred injected.

Load it with ``-p tokred_inject`` (this folder on ``PYTHONPATH``). It always:

* builds in-memory stand-ins for the two hub repos the fast tests load (``hf-internal-testing/tiny-random-clip``:
  a CLIP tokenizer; ``hf-internal-testing/tiny-random-t5``: a T5 tokenizer and a tiny ``T5Config``), saves them
  to a temporary folder and redirects ``from_pretrained`` of transformers' tokenizers, configs and models to it
  for those ids (every other id goes through unchanged, so other hub downloads fail as they would offline).

With ``TOKRED_RATIO=<r>`` set it also wraps ``__init__`` and ``__call__`` of every diffusers pipeline class whose
name matches ``TOKRED_PIPELINES`` (a regex, default: the Flux and SDXL pipelines). Every such pipeline gets
``tokred.apply(pipe, TOKRED_PRESET, ratio=r)`` as soon as its outermost ``__init__`` returns; that includes the
pipelines built by ``from_pretrained`` and ``from_pipe``, which construct through ``__init__`` too. A pipeline
without a ``unet`` / ``transformer`` module (e.g. ``FluxPriorReduxPipeline``) is left alone. Errors from
``tokred.apply`` are not caught: they fail the test at construction. ``__call__`` is only observed: it records
whether the patch was still in place and what the patch's statistics say the call merged.

Each test's observations go into its junit ``<properties>`` (``tokred_*``) and a per-session total is printed in
the terminal summary; ``TOKRED_REPORT=<path>`` also writes one JSON line per test.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
import tempfile
import weakref
from typing import Any

DEFAULT_PIPELINES = r"^(Flux|StableDiffusionXL)\w*Pipeline$"

# ----------------------------------------------------------------------------------------------------------------
# Offline stand-ins for the hub repos the fast tests load
# ----------------------------------------------------------------------------------------------------------------

CLIP_ID = "hf-internal-testing/tiny-random-clip"
T5_ID = "hf-internal-testing/tiny-random-t5"
_LOCAL: dict[str, str] = {}  # hub id -> local folder


def _clip_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level CLIP tokenizer built in memory: one token per character (ids < 514 < the tests' vocab 1000)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    vocab = {token: i for i, token in enumerate(tokens)}  # (not dict.update with len(vocab): that is one id for all)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():  # type: ignore[no-untyped-def]
    """A unigram T5 tokenizer built in memory: letters, digits and punctuation (about 150 ids)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + c, -4.0) for c in string.ascii_letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5_config():  # type: ignore[no-untyped-def]
    """The shape of hf-internal-testing/tiny-random-t5 as far as the tests need it: d_model 32 (Flux's
    ``joint_attention_dim``); the other sizes are the hub model's as remembered, weights are random anyway."""
    from transformers import T5Config

    return T5Config(
        vocab_size=1103,
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        initializer_factor=0.002,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def build_hub_standins(root: str) -> dict[str, str]:
    clip_dir = os.path.join(root, "tiny-random-clip")
    t5_dir = os.path.join(root, "tiny-random-t5")
    _clip_tokenizer().save_pretrained(clip_dir)
    _t5_config().save_pretrained(t5_dir)
    _t5_tokenizer().save_pretrained(t5_dir)
    return {CLIP_ID: clip_dir, T5_ID: t5_dir}


def _redirect_from_pretrained(cls: type) -> None:
    """Make ``cls.from_pretrained(<a stand-in id>, ...)`` load the local folder instead."""
    original = cls.__dict__["from_pretrained"]
    func = original.__func__

    @functools.wraps(func)
    def from_pretrained(klass, name_or_path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(name_or_path, str) and name_or_path in _LOCAL:
            name_or_path = _LOCAL[name_or_path]
        return func(klass, name_or_path, *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


def install_hub_standins() -> None:
    import transformers
    from transformers.configuration_utils import PreTrainedConfig
    from transformers.modeling_utils import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    root = tempfile.mkdtemp(prefix="tokred-difftests-hub-")
    _LOCAL.update(build_hub_standins(root))
    for cls in (
        transformers.AutoTokenizer,
        transformers.AutoConfig,
        PreTrainedTokenizerBase,
        PreTrainedConfig,
        PreTrainedModel,
    ):
        _redirect_from_pretrained(cls)


# ----------------------------------------------------------------------------------------------------------------
# tokred injection
# ----------------------------------------------------------------------------------------------------------------

_patches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser module -> the latest Patch on it
_init_depth = 0
_settings: dict[str, Any] = {}
_per_test: dict[str, int] = {}
_totals: dict[str, int] = {}
_wrapped: list[str] = []

COUNTERS = (
    "pipes_patched",  # pipelines that got tokred.apply after construction
    "pipes_no_denoiser",  # pipelines of a selected class without unet/transformer (left alone)
    "calls",  # __call__s of selected pipelines that have a denoiser
    "calls_unpatched",  # ... of them whose denoiser carried no active tokred patch (ratio > 0 only)
    "calls_merged",  # ... of them in which at least one site ran on fewer tokens
    "site_calls",  # site forward calls counted by the patches
    "site_merged_calls",  # ... of them that ran on fewer tokens
    "tokens_in",  # tokens entering merged site calls
    "tokens_out",  # tokens the merged site calls ran on
)


def _bump(name: str, n: int = 1) -> None:
    _per_test[name] = _per_test.get(name, 0) + n
    _totals[name] = _totals.get(name, 0) + n


def _denoiser(pipe: Any) -> Any:
    import torch

    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return getattr(module, "_orig_mod", module)
    return None


def _after_construction(pipe: Any) -> None:
    import tokred

    model = _denoiser(pipe)
    if model is None:
        _bump("pipes_no_denoiser")
        return
    _patches[model] = tokred.apply(pipe, _settings["preset"], ratio=_settings["ratio"])
    _bump("pipes_patched")


def _snapshot(patch: Any) -> tuple[int, int, int, int]:
    total = patch.stats.total
    return total.calls, total.merged_calls, total.tokens_in, total.tokens_out


def _observed_call(original_call: Any, pipe: Any, args: Any, kwargs: Any) -> Any:
    model = _denoiser(pipe)
    if model is None:
        return original_call(pipe, *args, **kwargs)
    patch = _patches.get(model)
    _bump("calls")
    if _settings["ratio"] > 0 and (patch is None or not patch.active):
        _bump("calls_unpatched")
    if patch is None:
        return original_call(pipe, *args, **kwargs)
    before = _snapshot(patch)
    result = original_call(pipe, *args, **kwargs)
    delta = [a - b for a, b in zip(_snapshot(patch), before, strict=True)]
    if min(delta) < 0:  # the statistics were reset during the call: count from zero
        delta = list(_snapshot(patch))
    calls, merged, tokens_in, tokens_out = delta
    _bump("calls_merged", int(merged > 0))
    _bump("site_calls", calls)
    _bump("site_merged_calls", merged)
    _bump("tokens_in", tokens_in)
    _bump("tokens_out", tokens_out)
    return result


def _wrap_pipeline_class(cls: type, selected: set[type]) -> None:
    """Wrap ``cls.__init__`` / ``__call__`` unless ``cls`` gets them from another selected class (which wraps
    them itself): each construction and each call is seen exactly once."""

    def owner(attr: str) -> type:
        return next(k for k in cls.__mro__ if attr in k.__dict__)

    if owner("__init__") is cls or owner("__init__") not in selected:
        original_init = cls.__init__

        @functools.wraps(original_init)
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            global _init_depth
            _init_depth += 1
            try:
                original_init(self, *args, **kwargs)
            finally:
                _init_depth -= 1
            if _init_depth == 0:  # the outermost constructor (a selected subclass may call a selected parent's)
                _after_construction(self)

        cls.__init__ = __init__

    if owner("__call__") is cls or owner("__call__") not in selected:
        original_call = cls.__call__

        @functools.wraps(original_call)
        def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return _observed_call(original_call, self, args, kwargs)

        cls.__call__ = __call__


def install_injection(ratio: float, preset: str, pattern: str) -> None:
    import diffusers
    from diffusers import DiffusionPipeline

    import tokred  # noqa: F401  (fail at start-up, not in every test, when tokred does not import)

    _settings.update(ratio=ratio, preset=preset, pattern=pattern)
    regex = re.compile(pattern)
    selected: dict[str, type] = {}
    for name in sorted(dir(diffusers)):
        if not regex.search(name):
            continue
        try:
            cls = getattr(diffusers, name)
        except Exception:  # a pipeline whose optional dependency is missing
            continue
        if isinstance(cls, type) and issubclass(cls, DiffusionPipeline):
            selected[name] = cls
    for name, cls in selected.items():
        _wrap_pipeline_class(cls, set(selected.values()))
        _wrapped.append(name)


# ----------------------------------------------------------------------------------------------------------------
# pytest hooks
# ----------------------------------------------------------------------------------------------------------------


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    install_hub_standins()
    ratio = os.environ.get("TOKRED_RATIO", "").strip()
    if ratio:
        install_injection(
            float(ratio),
            os.environ.get("TOKRED_PRESET", "toma").strip() or "toma",
            os.environ.get("TOKRED_PIPELINES", DEFAULT_PIPELINES),
        )


def pytest_report_header(config) -> list[str]:  # type: ignore[no-untyped-def]
    lines = [f"tokred_inject: hub stand-ins {sorted(_LOCAL)}"]
    if _settings:
        lines.append(
            f"tokred_inject: tokred.apply(pipe, {_settings['preset']!r}, ratio={_settings['ratio']}) on "
            f"{len(_wrapped)} pipeline classes matching {_settings['pattern']!r}"
        )
    else:
        lines.append("tokred_inject: TOKRED_RATIO unset, pipelines run unpatched")
    return lines


def pytest_runtest_logstart(nodeid, location) -> None:  # type: ignore[no-untyped-def]
    _per_test.clear()  # before setup, which a skip mark cuts short


# a test that compares against numbers written in its source, or against a reference image/array it loads
_FIXED_REFERENCE = re.compile(
    r"expected\w*\s*=\s*(np\.array|torch\.tensor|\[)|load_image\(|load_numpy\(|load_pt\(|hf_hub_download\(",
)


def fixed_reference(item) -> bool:  # type: ignore[no-untyped-def]
    import inspect

    try:
        return bool(_FIXED_REFERENCE.search(inspect.getsource(item.function)))
    except (OSError, TypeError, AttributeError):
        return False


def pytest_runtest_makereport(item, call) -> None:  # type: ignore[no-untyped-def]
    if call.when != "teardown":
        return
    item.user_properties.append(("fixed_reference", int(fixed_reference(item))))
    if not _settings:
        return
    for name in COUNTERS:
        item.user_properties.append((f"tokred_{name}", _per_test.get(name, 0)))
    path = os.environ.get("TOKRED_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": item.nodeid, **{k: _per_test.get(k, 0) for k in COUNTERS}}) + "\n")


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _settings:
        return
    parts = ", ".join(f"{name}={_totals.get(name, 0)}" for name in COUNTERS)
    terminalreporter.write_sep("-", "tokred_inject")
    terminalreporter.write_line(f"preset={_settings['preset']} ratio={_settings['ratio']}: {parts}")
