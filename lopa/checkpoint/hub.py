"""Model names → local checkpoint directories: THE one place a ``--model`` value is resolved.

A value that is an existing local directory is used as it is (so a local directory wins over a hub id of the
same spelling). The names of the checkpoints shipped inside the package (``lopa-tiny``, ``lopa-tiny-block``:
``lopa.checkpoint.bundled``) come next. Otherwise a value shaped like a Hugging Face hub id (``ORG/NAME``)
is fetched through ``huggingface_hub``'s standard cache (``snapshot_download``: ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_TOKEN`` all work as for transformers and vLLM), at ``revision`` (a branch, tag or commit;
default ``main``). Only the files lopa reads are downloaded (configs, tokenizer, chat template, safetensors weights).
``huggingface_hub`` is the optional ``hub`` extra (``pip install 'lopa[hub]'``).
"""

from __future__ import annotations

import re
from pathlib import Path

from lopa.checkpoint.bundled import bundled_checkpoint_dir
from lopa.errors import CheckpointNotFoundError, HubModelNotFoundError, HubNotInstalledError

# what lopa reads from a checkpoint; *.bin / *.pt / *.gguf duplicates of the weights are never downloaded
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(name: str) -> bool:
    """``ORG/NAME`` as the hub spells repository ids (no leading ``/``, ``.`` or ``~``, exactly one ``/``)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def model_name_for(model: str | Path, path: Path) -> str:
    """The id a model is served under: a hub id or bundled name as given, a local directory's own name."""
    return str(model) if path != Path(model).expanduser() else path.resolve().name


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """The local checkpoint directory for ``model``: a local directory, a bundled name (``lopa-tiny``,
    ``lopa-tiny-block``), else a hub id from the hub cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    bundled = bundled_checkpoint_dir(name)  # lopa-tiny, lopa-tiny-block: shipped inside the package
    if bundled is not None:
        return bundled
    if not is_hub_id(name):
        raise CheckpointNotFoundError(
            f"checkpoint directory {path} does not exist; pass a local directory holding config.json and "
            f"*.safetensors, or a Hugging Face hub id such as Dream-org/Dream-v0-Instruct-7B."
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise HubNotInstalledError(
            f"{name!r} is not a local directory; to load it as a Hugging Face hub id install the hub extra: "
            f"pip install 'lopa[hub]'"
        ) from e
    from huggingface_hub import constants

    at = f" at revision {revision!r}" if revision else ""
    fetch = f"hf download {name}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as e:
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise HubModelNotFoundError(
            f"{name}{at} is not a local directory and not in the hub cache ({constants.HF_HUB_CACHE}), and "
            f"{offline}. Download it where there is network with: {fetch} (the same HF_HOME / HF_HUB_CACHE), "
            f"or pass a local checkpoint directory."
        ) from e
    except (HfHubHTTPError, ValueError) as e:  # unknown repository or revision, gated, invalid id
        raise HubModelNotFoundError(
            f"{name}{at} could not be fetched from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e}); check the id and revision (and HF_TOKEN for a gated "
            f"model), or pass a local checkpoint directory."
        ) from e
