"""``preftune export --push-to-hub``: upload an exported model directory as one Hub commit.

``check_can_push`` runs before the export so a missing token or offline mode fails in a second, not after a
long merge. The upload is a single commit (``upload_folder``): it either lands whole or not at all, and
success is reported only with the commit's URL in hand.
"""

from __future__ import annotations

from pathlib import Path

from preftune.errors import PushError


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise PushError(
            "--push-to-hub needs huggingface_hub: pip install 'preftune[hub]'", user_fixable=True
        ) from None
    return huggingface_hub


def check_can_push(repo: str) -> None:
    """Raise ``PushError`` when an upload to ``repo`` cannot even be attempted."""
    hub = _hub()
    if hub.constants.HF_HUB_OFFLINE:
        raise PushError(
            f"cannot push to {repo}: HF_HUB_OFFLINE=1 is set (unset it to upload)", user_fixable=True
        )
    if hub.get_token() is None:
        raise PushError(
            f"cannot push to {repo}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)",
            user_fixable=True,
        )


def push_folder(folder: Path, repo: str, *, private: bool) -> str:
    """Create ``repo`` if needed (``private`` applies only then) and upload ``folder`` as one commit; return
    the commit URL."""
    hub = _hub()
    api = hub.HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo, folder_path=folder, commit_message="Upload model exported by preftune"
        )
    except Exception as e:  # network, HTTP (auth, permissions, quota) and validation errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PushError(
            f"upload to {repo} failed and the model files were not committed ({type(e).__name__}: {first}); "
            f"the export is complete in {folder}: retry with `hf upload {repo} {folder}`",
            user_fixable=False,
        ) from None
    return str(info.commit_url)
