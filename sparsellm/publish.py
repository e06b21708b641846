"""`sparsellm push`: upload an output folder to the Hugging Face hub (create_repo + upload_folder).
The token comes from where huggingface_hub looks (HF_TOKEN, `hf auth login`); it is never printed,
logged or written anywhere."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import PublishError

log = logging.getLogger(__name__)

REQUIRED = ("config.json", "report.json")


def files_to_upload(folder: Path) -> list[Path]:
    """Everything in the folder but hidden files (temp files of an interrupted write)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise PublishError(f"output folder not found: {folder}; give the folder sparsellm prune wrote")
    missing = [n for n in REQUIRED if not (folder / n).is_file()]
    if missing or not any(folder.glob("*.safetensors")):
        raise PublishError(f"{folder} is not a sparsellm output folder (missing {', '.join(missing) or '*.safetensors'}); "
                           "give the folder sparsellm prune wrote")


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False) -> dict:
    """Upload `folder` to `repo_id`. With dry_run, only says what would be uploaded (no token needed)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    check_folder(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PublishError(f"invalid repo id {repo_id!r}; use NAME or OWNER/NAME (letters, digits, - _ .)") from None
    files = files_to_upload(folder)
    plan = {"repo_id": repo_id, "private": private, "revision": revision or "main", "folder": str(folder),
            "files": [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size} for p in files]}
    token = get_token()
    if dry_run:
        plan["token_found"] = token is not None
        return plan
    if token is None:
        raise PublishError("no Hugging Face token found; log in with `hf auth login` or set HF_TOKEN, "
                           "or use --dry-run to see what would be uploaded")
    _card_with_repo_id(folder, repo_id)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo = getattr(url, "repo_id", None) or repo_id
        if revision and revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), revision=revision, repo_type="model",
                                   ignore_patterns=[".*", "**/.*"], commit_message="Upload model compressed with sparsellm")
    except Exception as e:  # HTTP errors, network: one line, the token never part of it
        raise _upload_error(e, repo_id, token) from None
    plan["url"] = str(getattr(commit, "commit_url", commit))
    return plan


def _upload_error(e: Exception, repo_id: str, token: str) -> PublishError:
    """One line naming what the hub said and the fix; the token is cut out of anything the server or the
    client library put in the message (a server may echo a request header back)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    text = " ".join(str(e).split()) or type(e).__name__
    if status == 401:
        problem, fix = "the hub refused the token (401 Unauthorized)", "log in again with `hf auth login` or set HF_TOKEN to a valid token"
    elif status == 403:
        problem, fix = "the token may not write there (403 Forbidden)", "use a token with write access to that namespace"
    elif status == 404:
        problem, fix = "the repository was not found (404)", "check the repo id, and that your token can see it"
    else:
        problem = text if status is None else f"HTTP {status}: {text}"
        problem = problem[:300]
        fix = "check the repo id, your token's write permission and the network"
    message = f"upload to {repo_id} failed: {problem}; {fix}"
    if token:
        message = message.replace(token, "<token>")
    return PublishError(message)


def _card_with_repo_id(folder: Path, repo_id: str) -> None:
    """The generated card's loading snippet names the folder; on the hub it should name the repo."""
    from .evaluate.card import MARKER, write_card

    readme = folder / "README.md"
    if readme.is_file() and MARKER in readme.read_text(encoding="utf-8"):
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        write_card(folder, report, folder.name, repo_id)
