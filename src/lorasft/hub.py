"""Hub ids (models `owner/name` or `hub:owner/name`, datasets `hub:owner/name[:split]`) resolved
in the local Hugging Face cache. Offline by default: nothing is downloaded at run time unless the
user's `allow_download` setting asks."""

from __future__ import annotations

import re
from pathlib import Path

HUB_PREFIX = "hub:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str, base_dir: Path | None = None) -> bool:
    """`hub:owner/name`, or `owner/name` that is no path here (from the working folder, nor from
    `base_dir`, a config file's folder)."""
    if path.startswith(HUB_PREFIX):
        return True
    if not HUB_ID.match(path):  # first: an id never starts with ~ or /, so nothing to expand
        return False
    return not (Path(path).exists() or (base_dir is not None and (base_dir / path).exists()))


def hub_snapshot(repo: str, repo_type: str, allow_download: bool, named: str,
                 error: type[Exception]) -> str:  # fmt: skip
    """The cached snapshot folder of a Hub repository; downloaded only with `allow_download`.
    A repository not cached is an error naming it and the command that fetches it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    try:  # the cache first, also when downloads are allowed: no check for a newer revision
        return snapshot_download(repo, repo_type=repo_type, local_files_only=True)
    except LocalEntryNotFoundError:
        setting = "data.allow_download" if repo_type == "dataset" else "model.allow_download"
        if not allow_download:
            raise error(
                f"{named}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); fetch "
                f"it with `hf download {repo}{kind}`, or set {setting}: true to let lorasft "
                "download it"
            ) from None
    except ValueError as e:  # not a valid repository id
        raise error(f"{named}: not a Hub repository id ({str(e).strip()[:200]})") from None
    try:
        return snapshot_download(repo, repo_type=repo_type)
    except (OSError, ValueError) as e:  # offline, no such repository, no access
        raise error(f"{named}: download failed ({str(e).strip()[:300]}); fetch it with "
                    f"`hf download {repo}{kind}`") from None  # fmt: skip
