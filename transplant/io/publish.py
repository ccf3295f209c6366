"""`--push-to-hub REPO_ID`: upload a finished output folder to the Hugging Face Hub.

Checked before any work (a transplant can take minutes; learning afterwards that the hub is unreachable or the
repo id malformed wastes them), uploaded only after the folder is complete and in place. The token comes
from the usual huggingface_hub places (HF_TOKEN, `hf auth login`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from transplant.errors import TransplantError, first_line

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_push(repo_id: str | None) -> None:
    """Refuse a malformed repo id or an unreachable hub in one line, before anything loads."""
    if repo_id is None:
        return
    from transplant.assets import catalog

    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise TransplantError(f"--push-to-hub {repo_id!r}: not a hub repo id; pass NAME or ORG/NAME")
    if catalog.is_hub_offline():
        why = "HF_HUB_OFFLINE is set" if catalog.offline_by_environment() else "the hub does not answer"
        raise TransplantError(f"--push-to-hub {repo_id}: {why}; run without --push-to-hub and upload the "
                              "output "
                              f"later with `hf upload {repo_id} OUTPUT_DIR`")


def push_folder(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Create `repo_id` if needed (private when asked) and upload `folder` as one commit; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message=f"Upload {Path(folder).name} (tokentransplant)")
    except Exception as err:  # hub errors come in many classes: auth, permissions, network
        reason = first_line(err)
        raise TransplantError(f"--push-to-hub {repo_id}: upload failed ({reason}); the output is complete in "
                              f"{folder}: upload it with `hf upload {repo_id} {folder}`") from err
    url = str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
    log.info("uploaded %s to %s", folder, url)
    return url
