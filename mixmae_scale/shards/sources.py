"""Finding the images of a split and their labels: ILSVRC2012 layouts, class folders, flat folders.

Class index = position of the wnid (or folder name) in sorted order, the torchvision/timm
convention, so that our labels agree with every ImageNet checkpoint trained by those libraries.
"""

from __future__ import annotations

import csv
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mixmae_scale.data.errors import plural
from mixmae_scale.data.image_names import IMAGE_SUFFIXES, is_image_name

# torchvision ImageFolder's IMG_EXTENSIONS: a file named otherwise (notes.txt, a README, labels.csv) is not an
# image of the dataset. It is ignored and counted, not rejected, so that it never counts against --max-rejected.


class SourceError(ValueError):
    """The source tree is not what the command expects; the message says what was expected."""


@dataclass(frozen=True)
class SourceImage:
    path: str  # absolute
    rel: str  # relative to the source root, recorded in each sample's json
    label: int  # -1 for unlabeled
    wnid: str | None
    size: int  # bytes on disk; used to size shards before any file is read


@dataclass(frozen=True)
class Duplicate:
    """A file left out because the image it is (its link's target) is already in the set as another file."""

    rel: str  # the file left out, relative to the source root
    same_as: str  # the file kept for that image (relative to its split's root)
    split: str  # the split the kept file is in
    link: bool  # `rel` is itself a link (else: reached through a linked folder)

    def reason(self) -> str:
        where = f" (split '{self.split}')" if self.split else ""
        how = "a link to" if self.link else "reached through a linked folder: the same file as"
        return f"{how} {self.same_as}{where}, an image already in the set (skipped, not written twice)"


def drop_duplicates(splits: Mapping[str, list[SourceImage]]) -> tuple[dict[str, list[SourceImage]],
                                                                      dict[str, list[Duplicate]]]:
    """Every split's images with each real file kept once, and the files left out, per split.

    A link to another image of the set was written as a second sample of that image (with its link's class, which
    may be another), so the count said one image more than there is and one image weighed twice. Links are
    followed: a link to a file outside the set is an image like any other. Of the files that are one real file,
    the first one named without a link is kept (else the first reached through a linked folder, else the first
    link), in split order then listing order, so that the file the user put there is the one recorded."""
    folders: dict[str, tuple[str, bool]] = {}  # a folder's real path and whether a link led there, found once

    def real_path(image: SourceImage) -> tuple[str, int]:
        """(the real file, 0 named directly / 1 in a folder reached through a link / 2 itself a link)."""
        if os.path.islink(image.path):
            return os.path.realpath(image.path), 2
        folder, name = os.path.split(image.path)
        if folder not in folders:
            root = image.path[:len(image.path) - len(image.rel)]  # the source root: a link above it is no link here
            real_folder = os.path.realpath(folder)
            folders[folder] = real_folder, real_folder != os.path.join(os.path.realpath(root),
                                                                       os.path.dirname(image.rel)).rstrip(os.sep)
        real_folder, linked = folders[folder]
        return os.path.join(real_folder, name), int(linked)

    real = {id(image): real_path(image) for images in splits.values() for image in images}
    holders: dict[str, tuple[str, SourceImage]] = {}
    for rank in (0, 1, 2):
        for split, images in splits.items():
            for image in images:
                path, how = real[id(image)]
                if how == rank and (how < 2 or os.path.isfile(path)):  # a dangling link is rejected later
                    holders.setdefault(path, (split, image))
    kept: dict[str, list[SourceImage]] = {}
    left_out: dict[str, list[Duplicate]] = {}
    for split, images in splits.items():
        kept[split], left_out[split] = [], []
        for image in images:
            path, how = real[id(image)]
            holder = holders.get(path)
            if holder is None or holder[1] is image:
                kept[split].append(image)
            else:
                left_out[split].append(Duplicate(image.rel, holder[1].rel, holder[0] if holder[0] != split else "",
                                                 how == 2))
    return kept, left_out


_NOT_UTF8 = re.compile(r"[\udc80-\udcff]")  # the surrogate escapes os.listdir gives bytes that are not UTF-8


def escaped(name: str) -> str:
    """A name listed from disk as a person can read and type it: the bytes that are not UTF-8 as `\\xNN`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def refuse_not_utf8(where: str, names: list[str], what: str, written_into: str, shown: int = 5) -> None:
    """The one refusal of names that are not UTF-8, for conversion's images and class folders and adoption's tars:
    each names them with those bytes escaped and gives the rename (convmv) that lets the same command run again."""
    if not names:
        return
    listed = ", ".join(f"'{escaped(name)}'" for name in names[:shown]) + (
        f" and {len(names) - shown} more" if len(names) > shown else "")
    raise SourceError(f"{escaped(where)}: {plural(len(names), what)} {'is' if len(names) == 1 else 'are'} not UTF-8 "
                      f"(the bytes that are not shown escaped): {listed}; {written_into}: rename them in UTF-8 (for "
                      f"names written in Latin-1: `convmv -r -f latin1 -t utf8 --notest {escaped(where)}`) and run the "
                      "same command again")


def not_utf8(rels: Iterable[str]) -> list[str]:
    """The names under a source root that are not UTF-8, each as the path to its first such part (a folder once,
    with a trailing '/', not every file in it). Such a name is listed as surrogate escapes, which dataset.json,
    classes.json and each sample's json then held as lone surrogates: JSON that strict readers refuse, and text that
    stops a print."""
    found = set()
    for rel in rels:
        parts = rel.rstrip("/").split("/")
        for depth, part in enumerate(parts):
            if _NOT_UTF8.search(part):
                found.add("/".join(parts[:depth + 1]) + ("/" if depth < len(parts) - 1 or rel.endswith("/") else ""))
                break
    return sorted(found)


def hidden_folders(ignored: list[str]) -> list[str]:
    """The hidden folders among `ignored` (listed with a trailing '/'); the rest are files."""
    return [name for name in ignored if name.endswith("/")]


def ignored_note(ignored: list[str], shown: int = 5) -> str:
    """'ignored 1 file that is not an image by name: notes.txt' (the first `shown` names), and the hidden folders
    skipped with what was in them."""
    folders = hidden_folders(ignored)
    files = [name for name in ignored if not name.endswith("/")]

    def first(names: list[str]) -> str:
        return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")

    one = len(files) == 1
    said = [f"ignored {len(files)} {'file that is not an image' if one else 'files that are not images'} by name "
            f"(images end in {', '.join(IMAGE_SUFFIXES)}): {first(files)}"] if files else []
    if folders:
        them = "it" if len(folders) == 1 else "them"
        said.append(f"skipped {plural(len(folders), 'hidden folder')} and what is in {them} ({first(folders)}): a "
                    "folder whose name starts with '.' (thumbnails, a drive's .Trash-1000/) is no part of the set; "
                    "rename it without the dot to convert its images")
    return "; ".join(said)


def _list_images(folder: Path, root: Path, label: int, wnid: str | None, ignored: list[str]) -> list[SourceImage]:
    """Every file under `folder` (recursively) named like an image; the others' relative paths go to `ignored`.

    Linked folders are followed, at any depth (os.walk skips them by default: a split spread over linked disks
    lost every image below its first level unsaid), each real folder once, so that a link back up the tree or two
    links to one folder neither loop nor count an image twice; as storage.list_files does for adoption."""
    found = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        # A hidden folder is no part of the set, as a hidden file is not: its images were converted as the class's
        # own (a `.thumbs/` of thumbnails, a drive's `.Trash-1000/` of deleted photos). Listed, with a trailing '/'.
        ignored += [str((Path(dirpath) / d).relative_to(root)) + "/" for d in sorted(dirnames) if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # A folder named like an image is listed too, so that it is reported (as unreadable), not lost.
        odd_folders = [d for d in dirnames if is_image_name(d) and not d.startswith(".")]
        for name in sorted(filenames + odd_folders):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if not is_image_name(name):
                ignored.append(str(path.relative_to(root)))
                continue
            found.append(SourceImage(str(path), str(path.relative_to(root)), label, wnid, _size_on_disk(path)))
    return found


def _size_on_disk(path: Path) -> int:
    """0 for a file that vanished or a dangling link since it was listed: reading it rejects it later."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_class_names(src: Path) -> dict[str, str]:
    """wnid -> human-readable name from LOC_synset_mapping.txt or synset_words.txt, when present."""
    for name in ("LOC_synset_mapping.txt", "synset_words.txt"):
        for candidate in (folder / name for folder in label_folders(src)):
            if candidate.exists():
                names = {}
                for line in candidate.read_text(encoding="utf-8-sig").splitlines():
                    wnid, _, words = line.strip().partition(" ")
                    if wnid:
                        names[wnid] = words.strip()
                return names
    return {}


def _loose_files(folder: Path, root: Path) -> list[str]:
    """Files beside the class folders (a README, a labels file): not part of any class."""
    return [str(p.relative_to(root)) for p in sorted(folder.iterdir())
            if not p.is_dir() and not p.name.startswith(".") and not is_image_name(p.name)]


def labeled_folder(split_dir: Path, root: Path, classes: list[str], ignored: list[str] | None = None
                   ) -> list[SourceImage]:
    ignored = [] if ignored is None else ignored
    ignored += _loose_files(split_dir, root)
    index = {wnid: i for i, wnid in enumerate(classes)}
    images: list[SourceImage] = []
    empty = []
    for wnid in class_folders(split_dir):
        if wnid not in index:
            raise SourceError(f"{split_dir / wnid}: class folder not among the training classes")
        found = _list_images(split_dir / wnid, root, index[wnid], wnid, ignored)
        if not found:
            empty.append(wnid)
        images.extend(found)
    if empty:
        raise SourceError(f"{split_dir}: {plural(len(empty), 'class folder')} without images: {', '.join(empty[:10])}"
                          + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
                          + (f" ({ignored_note(ignored)})" if ignored else ""))
    return images


KAGGLE_IMAGES = ("ILSVRC", "Data", "CLS-LOC")  # Kaggle's tree: its CSVs three folders above train/ and val/


def label_folders(src: Path) -> list[Path]:
    """Where an ImageNet tree's label files are looked for: SRC, the folder above it, and for Kaggle's download
    (imagenet-object-localization-challenge/ILSVRC/Data/CLS-LOC as SRC) the download's top folder, where Kaggle
    puts LOC_val_solution.csv and LOC_synset_mapping.txt."""
    folders = [src, src.parent]
    absolute = src.absolute()
    if absolute.parts[-3:] == KAGGLE_IMAGES:
        folders.append(absolute.parents[2])
    return folders


def _val_labels(src: Path) -> dict[str, str] | None:
    """Flat validation labels: file stem -> wnid, from Kaggle's CSV or the devkit ground truth."""
    for candidate in (folder / "LOC_val_solution.csv" for folder in label_folders(src)):
        if candidate.exists():
            # utf-8-sig: a CSV saved by Excel or a Windows editor starts with a byte-order mark, which made its first
            # column '\ufeffImageId' and refused a file that visibly has the columns.
            with candidate.open(encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                    raise SourceError(f"{candidate}: expected the columns ImageId,PredictionString; it has "
                                      f"{', '.join(reader.fieldnames or []) or 'none'} (Kaggle's file as downloaded "
                                      "has them)")
                return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}
    for candidate in (place / "ILSVRC2012_validation_ground_truth.txt" for folder in label_folders(src)
                      for place in (folder, folder / "ILSVRC2012_devkit_t12" / "data")):
        if candidate.exists():
            order = _devkit_wnids(src, candidate)
            labels = {}
            for i, line in enumerate(candidate.read_text(encoding="utf-8-sig").split(), start=1):
                ilsvrc_id = int(line)
                if not 1 <= ilsvrc_id <= len(order):
                    raise SourceError(f"{candidate}: line {i}: ILSVRC2012_ID {ilsvrc_id} out of range")
                labels[f"ILSVRC2012_val_{i:08d}"] = order[ilsvrc_id - 1]
            return labels
    return None


def _devkit_wnids(src: Path, truth: Path) -> list[str]:
    """The devkit numbers classes 1..1000 in its own order (meta.mat); we need wnid per ID.

    The order is read from `ILSVRC2012_devkit_order.txt` (one wnid per line, ID order) next to the
    ground truth, or from the devkit's meta.mat with scipy.
    """
    listed = truth.parent / "ILSVRC2012_devkit_order.txt"
    if listed.exists():
        return [w.strip() for w in listed.read_text(encoding="utf-8-sig").split() if w.strip()]
    meta = truth.parent / "meta.mat"
    if meta.exists():
        from scipy.io import loadmat

        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        rows = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if int(s["num_children"]) == 0)
        return [wnid for _, wnid in rows]
    raise SourceError(f"{truth}: the devkit class order is needed to map IDs to wnids; put the devkit's "
                      f"data/meta.mat (or ILSVRC2012_devkit_order.txt, one wnid per line) beside it")


def _class_tars(train_dir: Path) -> list[str]:
    """The per-class tars of ILSVRC2012_img_train.tar (n01440764.tar, ...) left in train/ unextracted; the
    download's own ILSVRC2012_img_*.tar, left beside them, is not one."""
    return sorted(p.name for p in train_dir.iterdir()
                  if p.name.endswith(".tar") and not p.name.startswith(("ILSVRC", ".")) and not p.is_dir())


def _first(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def imagenet_split(src: Path, split: str, ignored: list[str] | None = None) -> tuple[list[SourceImage], list[str]]:
    """Images and the class list (sorted wnids of train/) for one split of an ILSVRC2012 tree; the files not
    named like images go to `ignored`."""
    ignored = [] if ignored is None else ignored
    train_dir = src / "train"
    if not train_dir.is_dir():
        raise SourceError(f"{src}: not an ImageNet layout: expected {train_dir} with one folder per wnid "
                          "(n01440764/, ...), and val/ either the same way or flat with "
                          "LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt")
    classes = class_folders(train_dir)
    unextracted = _class_tars(train_dir)
    extract = ("extract each into its own folder and delete it (in train/: for f in n*.tar; do d=${f%.tar}; mkdir -p "
               "$d && tar xf $f -C $d && rm $f; done), then run the same command again")
    if not classes:
        raise SourceError(f"{train_dir}: no class folders" + (
            f"; {plural(len(unextracted), 'class tar')} not extracted ({_first(unextracted)}): {extract}" if unextracted
            else ""))
    if unextracted:
        first = unextracted[0]
        raise SourceError(f"{train_dir / first}: a class tar not extracted"
                          + (f" (and {len(unextracted) - 1} more)" if len(unextracted) > 1 else "")
                          + ": its images would be left out and the class indexes after it shifted; extract it "
                          f"(cd {train_dir} && mkdir {first[:-4]} && tar xf {first} -C {first[:-4]} && rm {first}); "
                          f"for all: {extract}")
    split_dir = src / split
    if not split_dir.is_dir():
        raise SourceError(f"{src}: split '{split}' has no folder {split_dir}"
                          + ("; --split train converts the training images alone" if split != "train" else ""))
    if split == "train" or class_folders(split_dir):
        return labeled_folder(split_dir, src, classes, ignored), classes
    labels = _val_labels(src)
    if labels is None:
        looked = ", ".join(str(folder) for folder in label_folders(src))
        raise SourceError(f"{split_dir} is flat, so its labels must come from LOC_val_solution.csv (Kaggle's) or "
                          f"ILSVRC2012_validation_ground_truth.txt (the devkit's, with its meta.mat); neither was "
                          f"found (looked in {looked}, and their ILSVRC2012_devkit_t12/data/); put "
                          f"LOC_val_solution.csv in {src} (a link will do) or sort val/ into wnid folders "
                          "(valprep.sh), and run the same command again (--split train converts train/ alone)")
    index = {wnid: i for i, wnid in enumerate(classes)}
    images = []
    for image in _list_images(split_dir, src, -1, None, ignored):
        wnid = labels.get(Path(image.path).stem)
        if wnid is None or wnid not in index:
            images.append(image)  # unlabeled: rejected later with the reason
            continue
        images.append(SourceImage(image.path, image.rel, index[wnid], wnid, image.size))
    return images, classes


def img2dataset_files_folders(src: Path, classes: list[str]) -> list[str]:
    """The subfolders that img2dataset's `files` output wrote (`00000/` beside `00000_stats.json`): download
    shards, whose numbers would pass for class labels."""
    return [name for name in classes if name.isdigit() and (src / f"{name}_stats.json").is_file()]


def folder_images(src: Path, ignored: list[str] | None = None, unlabeled: bool = False
                  ) -> tuple[list[SourceImage], list[str]]:
    """A class-per-subfolder tree (labels), or a flat folder of images (unlabeled, label -1); the files not
    named like images go to `ignored`. `unlabeled`: every image under `src`, its folders not read as classes."""
    ignored = [] if ignored is None else ignored
    if not src.is_dir():
        raise SourceError(f"{src}: not a folder")
    if is_ade20k_tree(src):
        raise SourceError(f"{src}: images/ and annotations/ are ADE20K's layout (images with their masks), not two "
                          "classes: convert it with `mixmae shards ade20k`")
    classes = [] if unlabeled else class_folders(src)
    if shards := img2dataset_files_folders(src, classes):
        are = "is a download shard" if len(shards) == 1 else "are download shards"
        raise SourceError(f"{src}: {shards[0]}/ beside {shards[0]}_stats.json is img2dataset's `files` output: its "
                          f"{plural(len(shards), 'numbered folder')} {are}"
                          ", not classes. Convert it with "
                          "--unlabeled (pretraining needs no labels), or download with output_format=webdataset "
                          "and `mixmae shards adopt` the tars")
    loose = [p for p in src.iterdir() if not p.is_dir() and is_image_name(p.name)]
    if classes and not loose:
        return labeled_folder(src, src, classes, ignored), classes
    if classes and loose:
        raise SourceError(f"{src}: has both class folders and loose images; use one layout")
    images = _list_images(src, src, -1, None, ignored)
    if not images:
        raise SourceError(f"{src}: no images found" + (f" ({ignored_note(ignored)})" if ignored else ""))
    return images, []


def ade20k_split(src: Path, split: str, ignored: list[str] | None = None) -> tuple[list[SourceImage], list[str]]:
    """ADE20K's layout (`images/{training,validation}/*.jpg`, masks under `annotations/`): the split's images,
    unlabeled (their labels are the masks, shards/masks.py), named relative to `src`."""
    from mixmae_scale.shards.masks import ADE20K_SPLITS

    ignored = [] if ignored is None else ignored
    if split not in ADE20K_SPLITS:
        raise SourceError(f"{src}: ADE20K's layout has the splits {', '.join(ADE20K_SPLITS)} "
                          f"({', '.join(ADE20K_SPLITS.values())} on disk), not '{split}'")
    folder, masks = src / "images" / ADE20K_SPLITS[split], src / "annotations" / ADE20K_SPLITS[split]
    if not folder.is_dir() or not masks.is_dir():
        raise SourceError(f"{src}: not ADE20K's layout: expected {folder} and {masks} (ADEChallengeData2016/ as "
                          "downloaded)")
    images = _list_images(folder, src, -1, None, ignored)
    if not images:
        raise SourceError(f"{folder}: no images found")
    return images, []


def is_ade20k_tree(src: Path) -> bool:
    return (src / "images").is_dir() and (src / "annotations").is_dir()


def hold_out(images: list[SourceImage], fraction: float, seed: int, kept: Mapping[str, str] | None = None
             ) -> tuple[list[SourceImage], list[SourceImage]]:
    """(train, val): `fraction` of each class held out for validation, drawn with `seed`, so that a folder of
    class subfolders becomes the two splits finetune, eval and probe need. Per class, not over the whole
    folder: a small class keeps its share in both splits. Every class keeps at least one training image.

    `kept` (file -> split) is the partition a conversion began with: those files stay in their split, and only
    files it does not name are drawn. Drawing again over a folder that changed moved files across (every class
    shares one generator): files already written to val went to train as well."""
    kept = kept or {}
    by_class: dict[int, list[SourceImage]] = defaultdict(list)
    train: list[SourceImage] = []
    val: list[SourceImage] = []
    for image in images:
        split = kept.get(image.rel)
        (train if split == "train" else val if split == "val" else by_class[image.label]).append(image)
    rng = random.Random(f"val-fraction-{seed}")
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda image: image.rel)
        rng.shuffle(group)
        count = min(len(group) - 1, round(fraction * len(group)))
        val += group[:count]
        train += group[count:]
    if images and not val and not kept:
        largest = max(Counter(image.label for image in images).values())
        raise SourceError(f"--val-fraction {fraction:g} holds out no image: round({fraction:g} x images of a class) "
                          f"is 0 for every class (the largest has {largest}), and each class keeps one for training; "
                          "raise the fraction")
    return train, val
