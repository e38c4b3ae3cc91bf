"""The pack's model folders: one registry of shipped artifacts, one resolver for every loader, one file-name
policy for every node that writes.

* ``SHIPPED``: per folder, the files that come with the pack (listed name -> path in the pack).  They are found
  this one way: the pack's own folders are not added to ComfyUI's folder paths, so ``folder_paths`` lists only
  the user's ``models/<folder>/`` (and any extra model paths).
* ``choices(folder)``: the shipped names, then the user's files (hidden files and folders, such as DeeDiff's
  ``.checkpoints/`` and temporary ``.partial`` files, are left out).
* ``resolve(folder, name, node, input_name)``: the path of a listed name.  A user file can never replace a
  shipped artifact under its name: a shipped name always means the shipped file, and when a user file of the
  same name sits in a user folder, loading that name is refused with both paths in the message.  Why a refusal
  rather than distinct names in the lists: saved workflows (``workflows/`` and users' graphs) name the shipped
  files by their plain names, which must keep working, and whoever put a file under that name expects it to be
  used, so using either one silently would be wrong for someone.
* ``output_path(folder, filename, node)``: where a writing node saves ``filename``, checked before any compute:
  a plain name (surrounding spaces and a ``.safetensors`` suffix dropped) with no ``/``, ``\\``, NUL or other
  control character, not hidden (leading ``.``), at most ``MAX_FILE_NAME_BYTES`` bytes with the suffix (room
  for ``samplers.bundles.save_bundle``'s temporary name next to it within the usual 255-byte limit), not an
  existing directory, not the name of a shipped artifact of that folder (it could never be selected).
"""
import os
from pathlib import Path

import folder_paths

from ...toyworld import weights

EXTENSION = ".safetensors"
FOLDERS = ("toyworld", "toyworld_v2", "classifiers", "ppap", "linear_ag", "learned_ag", "deediff", "lina")
TOY_CLASSIFIER = "toy_classifier.safetensors (toy world)"  # listed under a label: it is not a classifier bundle
TOY_EXPERTS = "toy_ppap_experts.safetensors"
TOY_LINA_PREDICTOR = "toy_lina_predictor.safetensors"
TOY_V2_DIT, TOY_V2_DIT_WEAK = "toy_v2_dit.safetensors", "toy_v2_dit_weak.safetensors"
TOY_V2_WEIGHTS = weights.WEIGHTS_DIR.parent / "v2" / "weights"  # toyworld.v2.weights.WEIGHTS_DIR (imports ComfyUI)
SHIPPED: dict[str, dict[str, Path]] = {
    "toyworld": {weights.MAIN_WEIGHTS.name: weights.MAIN_WEIGHTS, weights.WEAK_WEIGHTS.name: weights.WEAK_WEIGHTS},
    "toyworld_v2": {TOY_V2_DIT: TOY_V2_WEIGHTS / "dit.safetensors",
                    TOY_V2_DIT_WEAK: TOY_V2_WEIGHTS / "dit_weak.safetensors"},
    "classifiers": {TOY_CLASSIFIER: weights.CLASSIFIER_WEIGHTS},
    "ppap": {TOY_EXPERTS: weights.WEIGHTS_DIR / TOY_EXPERTS},
    "linear_ag": {"toy_dit_euler_simple_20_cfg4.safetensors":
                  weights.CALIBRATIONS_DIR / "toy_dit_euler_simple_20_cfg4.safetensors"},
    "learned_ag": {"toy_dit_learned_ag_euler_simple_20_cfg4.safetensors":
                   weights.CALIBRATIONS_DIR / "toy_dit_learned_ag_euler_simple_20_cfg4.safetensors"},
    "deediff": {weights.DEEDIFF_HEADS.name: weights.DEEDIFF_HEADS, weights.DEEDIFF_JOINT.name: weights.DEEDIFF_JOINT},
    "lina": {TOY_LINA_PREDICTOR: weights.WEIGHTS_DIR / TOY_LINA_PREDICTOR},
}
FILE_NAME_LIMIT = 255  # bytes of a file name on common file systems
TEMPORARY_NAME_EXTRA = len(".") + len(".") + 8 + len(".partial")  # save_bundle's ".<name>.XXXXXXXX.partial"
MAX_FILE_NAME_BYTES = FILE_NAME_LIMIT - TEMPORARY_NAME_EXTRA

for _folder in FOLDERS:
    folder_paths.add_model_folder_path(_folder, os.path.join(folder_paths.models_dir, _folder))
    folder_paths.folder_names_and_paths[_folder][1].add(EXTENSION)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.replace("\\", "/").split("/"))


def user_files(folder: str) -> list[str]:
    """The files of the user's ``models/<folder>/`` (and extra model paths), hidden ones left out."""
    return [name for name in folder_paths.get_filename_list(folder) if not _hidden(name)]


def choices(folder: str) -> list[str]:
    """What a loader lists: the shipped artifacts of ``folder``, then the user's files (a user file under a
    shipped name is listed once, as the shipped name)."""
    shipped = list(SHIPPED[folder])
    return shipped + [name for name in user_files(folder) if name not in SHIPPED[folder]]


def resolve(folder: str, name: str, node: str, input_name: str) -> str:
    """The path of ``name`` as listed by ``choices(folder)``; ValueError ``"<node>: '<input_name>' ..."`` for a
    name that is not listed, or a shipped name that a user file also has (both paths named)."""
    shipped = SHIPPED[folder].get(name) if isinstance(name, str) else None
    if shipped is not None:
        user = folder_paths.get_full_path(folder, name)
        if user is not None:
            raise ValueError(f"{node}: '{input_name}' {name!r} is the name of a file shipped with the pack "
                             f"({shipped}), and the user file {user} has the same name; rename or remove {user} "
                             "(a user file never replaces a shipped one)")
        return str(shipped)
    if isinstance(name, str) and name in user_files(folder):
        return folder_paths.get_full_path_or_raise(folder, name)
    raise ValueError(f"{node}: '{input_name}' must be a file listed from models/{folder}/ or shipped with the pack, "
                     f"got {name!r}")


def output_path(folder: str, filename, node: str, input_name: str = "filename") -> Path:
    """Where a writing node saves ``filename`` in the user's ``models/<folder>/`` (policy in the module
    docstring); ValueError ``"<node>: '<input_name>' ..."`` otherwise.  Call it before any compute."""
    where = f"{node}: '{input_name}'"
    name = str(filename).strip().removesuffix(EXTENSION)
    if not name or name.startswith(".") or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{where} must be a plain file name (no folder, no '/', '\\' or control character, not "
                         f"starting with '.'), got {filename!r}")
    file_name = name + EXTENSION
    try:
        size = len(file_name.encode())
    except UnicodeEncodeError:
        raise ValueError(f"{where} {filename!r} cannot be written as a file name (not valid Unicode)") from None
    if size > MAX_FILE_NAME_BYTES:
        raise ValueError(f"{where} is too long: {size} bytes with {EXTENSION}, at most {MAX_FILE_NAME_BYTES}")
    if file_name in SHIPPED[folder]:
        raise ValueError(f"{where} {file_name!r} is the name of a file shipped with the pack "
                         f"({SHIPPED[folder][file_name]}); choose another name (it could never be selected)")
    path = Path(folder_paths.get_folder_paths(folder)[0]) / file_name
    if os.path.lexists(path) and not path.is_symlink() and not path.is_file():
        raise ValueError(f"{where} {file_name!r}: {path} exists and is not a file")
    return path
