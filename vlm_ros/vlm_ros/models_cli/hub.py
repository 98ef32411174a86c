"""
What the hub says about a repository, asked through huggingface_hub.

huggingface_hub supplies everything users configure: the endpoint (``HF_ENDPOINT``), the
token (``HF_TOKEN``, or the one ``hf auth login`` stored under ``HF_HOME``), offline mode
(``HF_HUB_OFFLINE``), the cache (``HF_HOME`` / ``HF_HUB_CACHE``) and the request headers.
The listing comes from the model info API with file metadata: per file its size, its git
blob id and, for LFS files, the sha256 of the content -- what every download is checked
against. Works with huggingface_hub 0.x (requests) and 1.x and later (httpx).
"""

from dataclasses import dataclass
import importlib
from typing import Dict, Optional

import vlm_ros

LIBRARY = 'vlm_ros'


class HubError(RuntimeError):
    """The hub could not be asked, or said no; the message names the repository and why."""


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repository at one commit, as the hub's metadata describes it."""

    path: str
    size: Optional[int]
    blob_id: Optional[str]
    """git blob sha1 (for an LFS file: the pointer's, which says nothing of the content)."""
    sha256: Optional[str]
    """sha256 of the content; the hub gives it for LFS files only."""


@dataclass(frozen=True)
class Listing:
    """A repository's files at the commit a revision resolved to."""

    repo: str
    revision: str
    commit: str
    files: Dict[str, RemoteFile]


def offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    """Return the hub address in use (``HF_ENDPOINT`` or huggingface.co)."""
    from huggingface_hub import constants
    return constants.ENDPOINT


def network_errors():
    """Return the exception types a failed request raises, whichever HTTP stack is in use."""
    errors = [OSError]  # requests' errors and huggingface_hub's offline error are OSErrors
    for module, name in (('httpx', 'HTTPError'), ('httpx2', 'HTTPError'),
                         ('requests', 'RequestException')):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def list_files(repo, revision) -> Listing:
    """Return the files of ``repo`` at ``revision`` with sizes and hashes; HubError if not."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError,
                                       RepositoryNotFoundError, RevisionNotFoundError)
    where = f'{repo} at {endpoint()}'
    try:
        info = HfApi(library_name=LIBRARY, library_version=vlm_ros.__version__).model_info(
            repo, revision=revision, files_metadata=True)
    except GatedRepoError as exc:
        raise HubError(f'{where} is gated: accept its terms on the hub, then give a token '
                       f'(HF_TOKEN, or `hf auth login`) ({_first_line(exc)})') from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f'{where}: repository not found (a private one needs a token: '
                       f'HF_TOKEN) ({_first_line(exc)})') from exc
    except RevisionNotFoundError as exc:
        raise HubError(f'{where}: revision {revision!r} not found') from exc
    except HfHubHTTPError as exc:
        raise HubError(f'{where}: the hub answered with an error: {_first_line(exc)}') \
            from exc
    except network_errors() as exc:
        raise HubError(f'network error asking {where} for its files: '
                       f'{type(exc).__name__}: {_first_line(exc)}') from exc
    if not info.sha:
        raise HubError(f'{where}: the hub did not say which commit {revision!r} is')
    files = {}
    for sibling in info.siblings or ():
        lfs = sibling.lfs
        sha256 = getattr(lfs, 'sha256', None) if lfs is not None else None
        if sha256 is None and isinstance(lfs, dict):  # older releases: a plain dict
            sha256 = lfs.get('sha256')
        size = sibling.size
        if size is None and lfs is not None:
            size = lfs.get('size') if isinstance(lfs, dict) else getattr(lfs, 'size', None)
        files[sibling.rfilename] = RemoteFile(sibling.rfilename, size, sibling.blob_id,
                                              sha256.lower() if sha256 else None)
    return Listing(repo, revision, info.sha, files)


def file_url(repo, path, commit) -> str:
    """Return the download address of ``path`` at ``commit`` (the resolve endpoint)."""
    from huggingface_hub import hf_hub_url
    return hf_hub_url(repo, path, revision=commit)


def request_headers() -> Dict[str, str]:
    """Return huggingface_hub's headers: user agent and, when one is configured, the token."""
    from huggingface_hub.utils import build_hf_headers
    headers = build_hf_headers(library_name=LIBRARY, library_version=vlm_ros.__version__)
    headers['Accept-Encoding'] = 'identity'  # byte ranges count the file's own bytes
    return headers


def cached_copy(repo, path, revision) -> Optional[str]:
    """Return the path of ``path`` in the Hugging Face cache (``HF_HUB_CACHE``), if there."""
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(repo, path, revision=revision)
    return found if isinstance(found, str) else None


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
