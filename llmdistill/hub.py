"""Upload a run's exported student, with its model card, to the Hugging Face hub.

`push_student` checks everything it can here (the repository name, that the run exported a student), writes
the card, lists the files, and hands them to `upload`: the one function that talks to the hub. Failures there
(offline mode, no route to the hub, a refusal such as a missing token) become one-line errors.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from llmdistill.card import exported_student, write_model_card
from llmdistill.config import LLMDistillError


class HubError(LLMDistillError):
    pass


# The HTTP client's own errors (no route, timeout). huggingface_hub's HTTP errors derive from its client's
# HTTPError (httpx in 1.x, httpx2 in 2.x), as do the client's connection errors, so that base covers both
# versions without naming the client.
CLIENT_ERRORS = tuple(c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError")


def files_to_upload(student_dir: str | Path) -> list[str]:
    """Every file of the student folder (weights, config, tokenizer, README.md card, derivation masks), as
    paths relative to it; the upload takes exactly these."""
    student_dir = Path(student_dir)
    return sorted(p.relative_to(student_dir).as_posix() for p in student_dir.rglob("*") if p.is_file())


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"--repo-id {repo_id!r} is not a hub repository name (ORG/NAME): {err}") from None


def check_can_push(repo_id: str) -> None:
    """What a push at the end of training needs, checked before training starts (hours of training should not
    end in "no token"): a valid repository name, the hub not switched off, a token."""
    check_repo_id(repo_id)
    if is_offline_mode():
        raise HubError(
            f"train.push_to_hub ({repo_id}): the hub is offline here (HF_HUB_OFFLINE is set); unset it, or "
            "drop train.push_to_hub and run `llmdistill push` later from a machine that reaches the hub"
        )
    if get_token() is None:
        raise HubError(f"train.push_to_hub ({repo_id}): no Hugging Face token (`hf auth login` or HF_TOKEN)")


def push_student(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Write the run's model card, then upload its student folder to `repo_id` (created if missing, private
    when asked; `revision`: a branch, created if missing). Returns the commit's URL."""
    check_repo_id(repo_id)
    student_dir = exported_student(Path(run_dir))
    write_model_card(run_dir, student_dir, repo_id=repo_id)
    files = files_to_upload(student_dir)
    message = commit_message or f"Upload {Path(run_dir).name}, distilled with llmdistill"
    return upload(student_dir, files, repo_id, private, revision, message)


def upload(
    folder: Path, files: list[str], repo_id: str, private: bool, revision: str | None, message: str
) -> str:
    """Create the repository (and branch) if missing and commit `files` of `folder` to it, in one commit."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=files,
            revision=revision,
            commit_message=message,
        )
    except OfflineModeIsEnabled:
        raise HubError(
            f"cannot push to {repo_id}: the hub is offline here (HF_HUB_OFFLINE is set); unset it on a "
            "machine that reaches huggingface.co"
        ) from None
    except HfHubHTTPError as err:  # the hub answered with an error: no token, no rights, bad name
        status = err.response.status_code if err.response is not None else "?"
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        reason = _first_line(err)
        raise HubError(f"the hub refused the push to {repo_id} (HTTP {status}){hint}: {reason}") from None
    except CLIENT_ERRORS as err:  # no answer at all: DNS, connection, timeout
        raise HubError(f"cannot reach the hub to push {repo_id}: {_first_line(err)}") from None
    return info.commit_url


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
