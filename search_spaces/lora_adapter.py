"""PEFT LoRA adapters as merge sources, from their headers alone (stdlib only: no torch).

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. As a
source it stands for the full model that peft's ``merge_and_unload`` would make of it:
the base's tensors, where each targeted linear layer's weight ``W`` becomes
``W + B @ A × scale`` (``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
``use_rslora``; per module ``rank_pattern`` / ``alpha_pattern`` as peft resolves them; the
product transposed with ``fan_in_fan_out``), and where each tensor the adapter saves whole
(``modules_to_save``, trained biases) replaces the base's.

The service (validation) and the workers (the merge engine) both parse an adapter here, so
they accept and refuse the same adapters. What is refused, with the reason: LoRA variants
whose weights are not ``W + B·A·scale`` (DoRA, aLoRA, QALoRA, …), LoRA on embeddings or
convolutions, a saved tensor that changes a base tensor's shape, and an adapter whose
tensors do not fit its base. A refusal never quotes a file's bytes beyond names that look
like names (:func:`shown`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from search_spaces.safetensors_header import SafetensorsHeaderError, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MAX_CONFIG_BYTES = 1_000_000
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
PREFIX = "base_model.model."
# config fields that make a LoRA variant whose merged weight is not W + B @ A × scale
VARIANTS = {
    "use_dora": "DoRA (use_dora) rescales each merged column by a learned magnitude",
    "use_qalora": "QALoRA (use_qalora) pools its inputs in groups",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) acts only after its invocation tokens",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "layer_replication": "layer_replication changes the base's layers",
    "target_parameters": "target_parameters puts LoRA on raw parameters (e.g. MoE experts)",
    "trainable_token_indices": "trainable_token_indices trains single embedding rows",
}
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")
_SAVED = re.compile(r"\.modules_to_save\.[^.]+|\.base_layer(?=\.)")  # wrappers' segments, not the base's
_NAME = re.compile(r"^[\w.\-/+:@ ]{1,200}$")
_PATTERN = re.compile(r"^[\w.\-]{1,200}$")  # a rank_pattern / alpha_pattern key evomerge matches
MAX_PATTERNS = 1_000


class AdapterError(ValueError):
    """An adapter that cannot be used: ``msg`` says why, ``fix`` how, ``kind`` the problem's type."""

    def __init__(self, msg: str, fix: str, kind: str = "adapter_invalid") -> None:
        super().__init__(msg)
        self.msg, self.fix, self.kind = msg, fix, kind


def shown(text: Any) -> str:
    """A value read from a file, quoted only when it looks like a name (else not shown)."""
    return repr(text) if isinstance(text, str) and _NAME.match(text) else "(a value not shown)"


def is_adapter_folder(path: str | Path) -> bool:
    """A PEFT adapter folder: ``adapter_config.json`` and no model ``config.json``."""
    folder = Path(path)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def load_config(path: Path, ref: str) -> dict[str, Any]:
    """``adapter_config.json`` as a JSON object (bounded in size; the refusal quotes nothing)."""
    bad = AdapterError(f"adapter {ref!r}: {ADAPTER_CONFIG} is not a valid JSON object",
                       "re-save the adapter with peft's save_pretrained")
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise bad
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise bad from None
    if not isinstance(data, dict):
        raise bad
    return data


@dataclass(frozen=True)
class LoraPair:
    """One targeted weight: ``target`` in the base becomes ``target + B @ A × scale``."""

    target: str  # the base's tensor name (``model.layers.0.self_attn.q_proj.weight``)
    a: str  # tensor names in the adapter file
    b: str
    rank: int
    scale: float
    out_features: int
    in_features: int
    fan_in_fan_out: bool = False

    @property
    def target_shape(self) -> tuple[int, int]:
        """The shape the base's weight must have."""
        if self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


@dataclass
class LoraAdapter:
    """An adapter as its headers describe it."""

    ref: str
    config: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], str]]  # the file's tensors: name -> (shape, dtype)
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # base tensor name -> pair
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter tensor name

    @property
    def base_name(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value.strip() else None

    def largest_target_numel(self) -> int:
        """Elements of the largest tensor it changes (what composing one needs)."""
        sizes = [p.out_features * p.in_features for p in self.pairs.values()]
        sizes += [math.prod(self.tensors[n][0]) for n in self.replaced.values()]
        return max(sizes, default=0)

    def summary(self) -> str:
        """One line for people: rank, alpha, what it targets."""
        modules = sorted({p.target.rsplit(".", 2)[-2] for p in self.pairs.values()})
        parts = [f"r {self.config.get('r')}", f"lora_alpha {self.config.get('lora_alpha')}"]
        if self.config.get("use_rslora"):
            parts.append("rsLoRA scaling (alpha/sqrt(r))")
        if self.config.get("rank_pattern") or self.config.get("alpha_pattern"):
            parts.append("per-module rank_pattern/alpha_pattern")
        parts.append(f"{len(self.pairs)} LoRA weight(s) on {', '.join(modules) or 'no module'}")
        if self.replaced:
            parts.append(f"{len(self.replaced)} tensor(s) saved whole")
        return ", ".join(parts)


# ---- parsing (independent of the base) --------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override: the first pattern key that matches the module name's end."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return patterns[key]
        except re.error:
            continue
    return default


def _check_config(ref: str, config: Mapping[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(
            f"adapter {ref!r} is a {shown(peft_type)} adapter, not a LoRA adapter",
            "evomerge takes LoRA adapters only: merge this adapter into its base with peft's "
            "merge_and_unload and give the merged model", "adapter_unsupported")
    for key, what in VARIANTS.items():
        if config.get(key):
            raise AdapterError(
                f"adapter {ref!r}: {what}; evomerge composes plain LoRA only (W + B·A·alpha/r)",
                "merge this adapter into its base with peft's merge_and_unload and give the merged model "
                "as a source", "adapter_unsupported")
    if "lora_alpha" not in config or not _number(config["lora_alpha"]):
        raise AdapterError(
            f"adapter {ref!r}: {ADAPTER_CONFIG} has no numeric lora_alpha, so the scale alpha/r of its "
            "weights is unknown", "add lora_alpha (the value the adapter was trained with) to "
            f"{ADAPTER_CONFIG}", "adapter_invalid")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"adapter {ref!r}: {ADAPTER_CONFIG} has no positive integer rank r",
                           f"set r in {ADAPTER_CONFIG} to the adapter's rank", "adapter_invalid")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(_number(v) for v in value.values()):
            raise AdapterError(f"adapter {ref!r}: {key} in {ADAPTER_CONFIG} is not a map of module "
                               "patterns to numbers", f"re-save the adapter with peft ({key})",
                               "adapter_invalid")
        # peft reads the keys as regular expressions; validation must stay bounded in time
        if len(value) > MAX_PATTERNS or not all(_PATTERN.match(k) for k in value):
            raise AdapterError(
                f"adapter {ref!r}: {key} in {ADAPTER_CONFIG} has keys that are not module names (letters, "
                f"digits, '_', '-', '.'), or more than {MAX_PATTERNS}",
                f"write {key}'s keys as module names (e.g. 'q_proj' or 'model.layers.3.mlp.down_proj'), or "
                "merge the adapter into its base first", "adapter_unsupported")


def _unsupported_tensor(ref: str, name: str) -> AdapterError | None:
    if "lora_magnitude_vector" in name:
        return AdapterError(f"adapter {ref!r} holds DoRA magnitude vectors", "merge it into its base with "
                            "peft's merge_and_unload first", "adapter_unsupported")
    if "lora_embedding_" in name:
        return AdapterError(f"adapter {ref!r} has LoRA on an embedding layer, which evomerge does not "
                            "compose", "train the adapter without embedding targets, or merge it into its "
                            "base with peft's merge_and_unload first", "adapter_unsupported")
    if ".lora_" in name:
        return AdapterError(f"adapter {ref!r} holds LoRA tensors of a kind evomerge does not compose "
                            f"({shown(name)})", "merge it into its base with peft's merge_and_unload first",
                            "adapter_unsupported")
    return None


def parse_adapter(ref: str, config: Mapping[str, Any],
                  tensors: Mapping[str, tuple[Sequence[int], str]]) -> LoraAdapter:
    """The adapter from its config and its file's header: every check that needs no base."""
    _check_config(ref, config)
    own = {n: (tuple(int(d) for d in shape), str(dtype)) for n, (shape, dtype) in tensors.items()}
    adapter = LoraAdapter(ref=ref, config=dict(config), tensors=own)
    halves: dict[str, dict[str, str]] = {}
    for name, (_shape, dtype) in own.items():
        if dtype not in FLOAT_DTYPES:
            raise AdapterError(f"adapter {ref!r}: tensor {shown(name)} is not floating point "
                               f"({shown(dtype)})", "re-save the adapter in float32, bfloat16 or float16",
                               "adapter_unsupported")
        plain = _SAVED.sub("", name.removeprefix(PREFIX))
        m = _LORA.match(plain)
        if m is None:
            err = _unsupported_tensor(ref, plain)
            if err is not None:
                raise err
            adapter.replaced[plain] = name
            continue
        halves.setdefault(m["module"], {})[m["ab"]] = name
    for module, ab in sorted(halves.items()):
        adapter.pairs[f"{module}.weight"] = _pair(adapter, module, ab)
    if not adapter.pairs and not adapter.replaced:
        raise AdapterError(f"adapter {ref!r}: {ADAPTER_WEIGHTS} holds no LoRA tensors",
                           "re-save the adapter with peft's save_pretrained", "adapter_invalid")
    return adapter


def _pair(adapter: LoraAdapter, module: str, ab: Mapping[str, str]) -> LoraPair:
    ref, config = adapter.ref, adapter.config
    if set(ab) != {"A", "B"}:
        missing = "lora_B" if "A" in ab else "lora_A"
        raise AdapterError(f"adapter {ref!r}: module {shown(module)} has no {missing} tensor",
                           "re-save the adapter with peft's save_pretrained", "adapter_invalid")
    a, b = adapter.tensors[ab["A"]][0], adapter.tensors[ab["B"]][0]
    if len(a) != 2 or len(b) != 2:
        raise AdapterError(f"adapter {ref!r}: module {shown(module)} is not a linear layer (LoRA tensors "
                           f"of {len(a)} and {len(b)} dimensions: a convolution?)",
                           "evomerge composes LoRA on linear layers only: merge it into its base with peft's "
                           "merge_and_unload first", "adapter_unsupported")
    rank = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    if a[0] != rank or b[1] != rank:
        raise AdapterError(
            f"adapter {ref!r}: module {shown(module)} has LoRA tensors of rank {a[0]} (lora_A {list(a)}, "
            f"lora_B {list(b)}) but {ADAPTER_CONFIG} says r = {rank}",
            "give the adapter's own adapter_config.json (r and rank_pattern as it was trained)",
            "adapter_rank_mismatch")
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraPair(target=f"{module}.weight", a=ab["A"], b=ab["B"], rank=rank, scale=scale,
                    out_features=b[0], in_features=a[1], fan_in_fan_out=bool(config.get("fan_in_fan_out")))


# ---- against the base -----------------------------------------------------------------------
def base_name_matches(declared: str | None, names: Iterable[str]) -> bool:
    """Whether ``base_model_name_or_path`` names the base: equal, or the same last path part
    (``org/Llama-3-8B`` and ``/srv/models/Llama-3-8B``), case aside. Unknown (empty): True."""
    if not declared:
        return True
    tail = PurePosixPath(declared.rstrip("/")).name.lower()
    for name in names:
        name = str(name).rstrip("/")
        if name == declared.rstrip("/") or PurePosixPath(name).name.lower() == tail:
            return True
    return False


def _module_matches(module: str, target: str) -> bool:
    return module == target or module.endswith("." + target)


def check_against_base(adapter: LoraAdapter, base_shapes: Mapping[str, Sequence[int]], *,
                       base_names: Sequence[str] | None, base_given: str) -> None:
    """Refuse an adapter that does not fit the base: another base's name (unless ``base_names``
    is None), a target the base lacks, a LoRA pair whose shapes do not fit the weight it targets,
    a saved tensor of another shape."""
    ref = adapter.ref
    if base_names is not None and not base_name_matches(adapter.base_name, base_names):
        raise AdapterError(
            f"adapter {ref!r} was trained on {shown(adapter.base_name)} ({ADAPTER_CONFIG}'s "
            f"base_model_name_or_path), not on the base {base_given!r}",
            "give the base the adapter was trained on as base_model; if it is that model under another "
            f"name, set base_model_name_or_path in {ADAPTER_CONFIG} to its folder name or hub id",
            "adapter_base_mismatch")
    fix = "use an adapter trained on this base model (same architecture and size)"
    for target, pair in adapter.pairs.items():
        shape = base_shapes.get(target)
        if shape is None:
            tied = target.endswith(("lm_head.weight", "embed_out.weight"))
            raise AdapterError(
                f"adapter {ref!r} targets {shown(target.removesuffix('.weight'))}, which the base "
                f"{base_given!r} does not have" + (" (its head is tied to the embeddings)" if tied else ""),
                fix, "adapter_base_mismatch")
        if tuple(shape) != pair.target_shape:
            raise AdapterError(
                f"adapter {ref!r}: the LoRA pair of {shown(target.removesuffix('.weight'))} makes a "
                f"{list(pair.target_shape)} update, the base's weight is {list(shape)}", fix,
                "adapter_shape_mismatch")
    for target, name in adapter.replaced.items():
        shape = base_shapes.get(target)
        if shape is None or tuple(shape) != adapter.tensors[name][0]:
            what = "is not in the base" if shape is None else f"is {list(shape)} in the base"
            raise AdapterError(
                f"adapter {ref!r} saves {shown(target)} whole (modules_to_save or a trained bias) as "
                f"{list(adapter.tensors[name][0])}, which {what}: evomerge merges models of one shape",
                "train the adapter without modules_to_save that change shapes (e.g. a resized vocabulary), "
                "or merge it into its base with peft's merge_and_unload first", "adapter_shape_mismatch")
    _check_target_modules(adapter, base_shapes, base_given)


def _check_target_modules(adapter: LoraAdapter, base_shapes: Mapping[str, Sequence[int]],
                          base_given: str) -> None:
    """A list of ``target_modules`` names modules of the base, and covers the LoRA tensors."""
    targets = adapter.config.get("target_modules")
    if not isinstance(targets, list) or not adapter.pairs:
        return  # a regex string, or "all-linear": the tensors were checked one by one
    names = [t for t in targets if isinstance(t, str)]
    modules = {n.rsplit(".", 1)[0] for n in base_shapes}
    if not any(_module_matches(m, t) for t in names for m in modules):
        raise AdapterError(f"adapter {adapter.ref!r}: none of its target_modules is a module of the base "
                           f"{base_given!r}", "use an adapter trained on this base model",
                           "adapter_base_mismatch")
    for pair in adapter.pairs.values():
        module = pair.target.removesuffix(".weight")
        if not any(_module_matches(module, t) for t in names):
            raise AdapterError(
                f"adapter {adapter.ref!r}: its weights change {shown(module)}, which its target_modules do "
                "not name", f"give the adapter's own {ADAPTER_CONFIG}", "adapter_invalid")


def read_adapter(folder: str | Path, ref: str | None = None) -> LoraAdapter:
    """Parse a local adapter folder (the workers' side: its path was checked when the study was
    validated, or a user named it to ``evomerge merge``)."""
    folder = Path(folder)
    ref = ref or str(folder)
    config = load_config(folder / ADAPTER_CONFIG, ref)
    try:
        header = read_header(folder / ADAPTER_WEIGHTS)
    except (SafetensorsHeaderError, OSError) as err:
        why = (str(err) if isinstance(err, SafetensorsHeaderError)
               else f"it cannot be read ({type(err).__name__})")
        raise AdapterError(f"adapter {ref!r}: {ADAPTER_WEIGHTS} is not a readable safetensors file: {why}",
                           "save the adapter with peft's save_pretrained", "adapter_no_weights") from None
    return parse_adapter(ref, config, {n: (t.shape, t.dtype) for n, t in header.tensors.items()})
