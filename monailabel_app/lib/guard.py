"""Confinement of the MONAI Label server's files: a datastore and a session store that never reach outside their folder.

MONAI Label 0.8.5 joins the ids, label tags and session ids that clients send onto its folders as they come, and
follows symbolic links: ``PUT /datastore/image?image=../x`` writes outside the studies folder, a tag ``../..`` writes a
label anywhere, ``DELETE /datastore/image`` of a link deletes the link's target, a session archive with a member
``../../x`` unpacks outside the session folder. The app replaces both stores with the classes here, so every stock
route goes through them:

* :func:`check_name`: an id, tag or session id must be a plain file name (no ``/`` or ``\\``, not ``.`` / ``..``, no
  NUL or other control characters); anything else is refused with HTTP 400.
* :class:`ConfinedDatastore`: files whose real path (links followed) lies outside the studies folder are neither listed,
  read nor deleted (a link inside the folder that points out is treated as absent; deleting an entry removes a link,
  never its target); uploads must be NIfTI (``.nii`` / ``.nii.gz``); a refused upload's temporary file is removed.
* :class:`ConfinedSessions`: session ids are plain names; archive members (tar or zip) must land inside the session
  folder (no absolute names, no ``..``, no links, devices or FIFOs); a refused upload leaves nothing behind.

Errors name the offending value as the client sent it, never a server path.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tarfile
import tempfile
import time
import zipfile
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.utils.sessions import Sessions

logger = logging.getLogger(__name__)

__all__ = ["ConfinedDatastore", "ConfinedSessions", "check_name", "is_within"]

#: File name endings the datastore accepts for uploaded images and labels (exactly these, lower case).
UPLOAD_SUFFIXES = (".nii.gz", ".nii")
#: Longest id, tag or session id accepted (file names stay under the usual 255-byte limit).
MAX_NAME = 200


def is_within(path: str, folder: str) -> bool:
    """Whether ``path`` (resolved, symlinks followed) lies inside ``folder`` (resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def check_name(value: Any, what: str) -> str:
    """``value`` if it is a plain file name, safe to join onto a folder; else HTTP 400 naming ``what``.

    Raises:
        fastapi.HTTPException: 400 for a non-string, an empty string, ``.`` / ``..``, a path separator, a NUL or
            another control character.
    """
    if not isinstance(value, str) or not value:
        raise HTTPException(status_code=400, detail=f"{what}: expected a non-empty name, got {value!r}.")
    bad = [c for c in value if c in "/\\" or ord(c) < 32 or ord(c) == 127]
    if bad or value in (".", "..") or len(value) > MAX_NAME:
        raise HTTPException(
            status_code=400,
            detail=f"{what} {value[:80]!r}: expected a plain name of at most {MAX_NAME} characters (no '/', '\\', "
            "'..', or control characters).",
        )
    return value


def _remove_quietly(path: str | None) -> None:
    if path and os.path.isfile(path):
        try:
            os.remove(path)
        except OSError:
            pass


def upload_suffix(filename: str, what: str) -> str:
    """The NIfTI ending of an upload (MONAI Label's temporary copy keeps the client's file ending); else HTTP 415."""
    for suffix in UPLOAD_SUFFIXES:
        if filename.endswith(suffix):
            return suffix
    ending = "".join(pathlib.Path(filename).suffixes) or "no file ending"
    raise HTTPException(
        status_code=415, detail=f"{what}: expected a NIfTI file ({' or '.join(UPLOAD_SUFFIXES)}), got {ending!r}."
    )


class ConfinedDatastore(LocalDatastore):
    """MONAI Label's ``LocalDatastore`` confined to its folder (see the module doc); same constructor."""

    # -- confinement helpers -------------------------------------------------------------------------------------------
    def _inside(self, path: str) -> bool:
        return is_within(path, self._datastore_path)

    def _image_link(self, image_id: str) -> str:
        """The image's path in the datastore, links not followed ("" for an unknown id)."""
        obj = self._datastore.objects.get(image_id)
        return os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext)) if obj else ""

    def _label_link(self, label_id: str, label_tag: str) -> str:
        label = self._datastore.label(label_id, label_tag)
        return os.path.join(self._datastore.label_path(label_tag), self._filename(label_id, label.ext)) if label else ""

    def _remove_entry(self, path: str) -> None:
        """Remove a datastore entry: a link itself (never its target), or a regular file, in a folder of the
        datastore (a tag folder swapped for a link to elsewhere is left alone)."""
        if not path or not self._inside(os.path.dirname(path)):
            return
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)

    # -- listing: files that resolve outside are not part of the datastore ---------------------------------------------
    def _list_files(self, path, patterns):
        files = super()._list_files(path, patterns)
        return {name: f for name, f in files.items() if self._inside(os.path.join(path, f))}

    def _remove_non_existing(self) -> int:
        invalidate = super()._remove_non_existing()
        for image_id in list(self._datastore.objects):
            obj = self._datastore.objects[image_id]
            if not self._inside(self._image_link(image_id)):
                logger.warning("datastore: %r resolves outside the studies folder; not served", image_id)
                del self._datastore.objects[image_id]
                invalidate += 1
                continue
            for tag in list(obj.labels):
                if not self._inside(self._label_link(image_id, tag)):
                    logger.warning("datastore: label %r / %r resolves outside the studies folder", image_id, tag)
                    del obj.labels[tag]
                    invalidate += 1
        return invalidate

    # -- reads -------------------------------------------------------------------------------------------------------
    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Image / label pairs for training, without any file that resolves outside the studies folder (checked now,
        not at the last refresh: also what ``GET /datastore/dataset`` zips)."""
        full = super().datalist(True)
        keep = [all(self._inside(str(v)) for v in d.values()) for d in full]
        items = full if full_path else super().datalist(False)
        return [d for d, k in zip(items, keep) if k]

    def get_image_uri(self, image_id: str) -> str:
        check_name(image_id, "image id")
        link = self._image_link(image_id)
        return os.path.realpath(link) if link and self._inside(link) else ""

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        check_name(image_id, "image id")
        return super().get_image_info(image_id) if self.get_image_uri(image_id) else {}

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        check_name(label_id, "label id")
        check_name(label_tag, "label tag")
        link = self._label_link(label_id, label_tag)
        return os.path.realpath(link) if link and self._inside(link) else ""

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        check_name(label_id, "label id")
        check_name(label_tag, "label tag")
        return super().get_label_info(label_id, label_tag) if self.get_label_uri(label_id, label_tag) else {}

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        check_name(image_id, "image id")
        return super().get_labels_by_image_id(image_id)

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        check_name(image_id, "image id")
        check_name(tag, "label tag")
        return super().get_label_by_image_id(image_id, tag)

    # -- writes ------------------------------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Copy an uploaded NIfTI image in as ``image_id`` (a plain name; default: the file's stem). A refused upload's
        file (MONAI Label's temporary copy) is removed."""
        try:
            suffix = upload_suffix(image_filename, "image upload")
            if not image_id:
                image_id = os.path.basename(image_filename)[: -len(suffix)]
            check_name(image_id, "image id")
            dest = os.path.join(self._datastore.image_path(), image_id + suffix)
            if os.path.islink(dest):  # replace a link by the upload, never write through it
                os.unlink(dest)
        except HTTPException:
            _remove_quietly(image_filename)
            raise
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Save a NIfTI label of a known image under a plain tag; a refused upload's file is removed."""
        try:
            check_name(image_id, "image id")
            check_name(label_tag, "label tag")
            suffix = upload_suffix(label_filename, "label upload")
            if not self.get_image_uri(image_id):
                raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore.")
            dest = os.path.join(self._datastore.label_path(label_tag), image_id + suffix)
            if not self._inside(os.path.dirname(dest)):
                raise HTTPException(
                    status_code=403, detail=f"label tag {label_tag!r}: its folder is outside the datastore."
                )
            if os.path.islink(dest):
                os.unlink(dest)
        except HTTPException:
            _remove_quietly(label_filename)
            raise
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_image(self, image_id: str) -> None:
        """Remove an image and its labels: links are removed themselves, never their targets."""
        check_name(image_id, "image id")
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore.")
        for tag in list(obj.labels):
            self._remove_entry(self._label_link(image_id, tag))
        self._remove_entry(self._image_link(image_id))
        self.refresh()

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_name(label_id, "label id")
        check_name(label_tag, "label tag")
        link = self._label_link(label_id, label_tag)
        if not link:
            raise HTTPException(
                status_code=404, detail=f"no label {label_id!r} with tag {label_tag!r} in the datastore."
            )
        self._remove_entry(link)
        self.refresh()

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        check_name(image_id, "image id")
        return super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        check_name(label_id, "label id")
        check_name(label_tag, "label tag")
        return super().update_label_info(label_id, label_tag, info)


def _check_member(member: str, kind_ok: bool) -> None:
    parts = member.replace("\\", "/").split("/")
    if not kind_ok or member.startswith(("/", "\\")) or ".." in parts or (len(member) > 1 and member[1] == ":"):
        raise HTTPException(
            status_code=400,
            detail=f"session archive: member {member!r} would land outside the session folder or is not a regular "
            "file; expected relative names of files and folders only.",
        )


def unpack_archive(archive: str, folder: str) -> None:
    """Unpack the tar or zip ``archive`` into ``folder`` after checking every member (HTTP 400 unless each is a
    regular file or folder with a relative name that stays inside); tar members go through the ``data`` filter (no
    special modes or owners)."""
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m.name, m.isfile() or m.isdir())
            tar.extractall(folder, members=members, filter="data")
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = (info.external_attr >> 16) & 0o170000
                _check_member(info.filename, mode in (0, 0o100000, 0o040000))  # unknown, regular file, folder
            zf.extractall(folder)
    else:
        raise HTTPException(status_code=400, detail="session archive: expected a tar or zip file (uncompress=true).")


class ConfinedSessions(Sessions):
    """MONAI Label's session store with plain session ids and archives checked before they are unpacked."""

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        check_name(session_id, "session id")
        return super().get_session(session_id, update_ts=update_ts, fetch_cache=fetch_cache)

    def remove_session(self, session_id: str):
        check_name(session_id, "session id")
        return super().remove_session(session_id)

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        """Store an upload as a new session; an archive is checked member by member and unpacked here (not by
        ``shutil.unpack_archive``, which goes by the file name's ending and keeps modes). On refusal or failure the
        upload (MONAI Label's temporary file and its temporary folder) is removed."""
        unpacked = None
        try:
            if session_id is not None:
                check_name(session_id, "session id")
            if uncompress and not os.path.isdir(data_file):
                unpacked = tempfile.mkdtemp(prefix="keymorph_session_")
                unpack_archive(data_file, unpacked)
                self._discard_upload(data_file)
                data_file, uncompress = unpacked, False
            return super().add_session(data_file, expiry, uncompress, session_id)
        except HTTPException:
            self._discard_upload(data_file)
            raise
        except OSError as err:
            self._discard_upload(data_file)
            raise HTTPException(
                status_code=400, detail=f"session upload: cannot be stored ({type(err).__name__})."
            ) from err
        finally:
            if unpacked is not None and os.path.isdir(unpacked):
                shutil.rmtree(unpacked, ignore_errors=True)

    def remove_expired(self) -> int:
        """MONAI Label's cleanup, skipping (and removing) session folders without a readable record instead of
        failing on them."""
        count = 0
        if not os.path.isdir(self.store_path):
            return count
        now = int(time.time())
        for item in os.listdir(self.store_path):
            if not os.path.isdir(os.path.join(self.store_path, item)):
                continue
            try:
                info = self.get_session(item, update_ts=False, fetch_cache=False)
            except Exception:  # an unreadable record
                info = None
            if info is None:
                super().remove_session(item)
                count += 1
            elif info.expiry > 0 and info.last_access_ts + info.expiry < now:
                super().remove_session(item)
                count += 1
        return count

    @staticmethod
    def _discard_upload(data_file: str) -> None:
        """Remove a refused upload: the file, and the temporary folder MONAI Label received it in."""
        received = data_file if os.path.isdir(data_file) else os.path.dirname(data_file)
        if is_within(received, tempfile.gettempdir()) and os.path.realpath(received) != os.path.realpath(
            tempfile.gettempdir()
        ):
            shutil.rmtree(received, ignore_errors=True)
        else:
            _remove_quietly(data_file)
