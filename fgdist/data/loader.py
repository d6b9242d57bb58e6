"""Per-rank WebDataset streams.

Routing (docs/DESIGN.md, "The data path"):
- by_superclass: rank r streams exactly the samples whose instance ids it owns: the shards
  overlapping its column range, filtered at the two boundaries.
- shuffled: ordinary data parallel; the shard list is dealt out over all ranks.

Every rank takes the same number of steps per epoch, ceil(n / (world * batch)): a rank's stream
is endless (pass after pass, each reshuffled) and the loader takes exactly that many batches, so
a rank with fewer samples resamples some and collectives never wait on a rank that stopped.
Each epoch's stream is a pure function of (seed, epoch, rank, worker): a resume replays it, and
passes the batches already trained without augmenting them (with data.on_corrupt=skip it decodes
them, to count the undecodable samples that took no place in a batch).

Shards are read by fgdist/data/remote.py: from the shard set's folder, or from data.shards_url
(`open_data_split`), a remote shard checked against its manifest checksum as it streams.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import itertools
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fgdist.config import DataConfig
from fgdist.data.augment import SINGLE_CHANNEL_MODES, random_resized_crop, strong_augment, with_views
from fgdist.data.partition import Plan
from fgdist.data.remote import TarReader
from fgdist.data.shardset import DECODE_ERRORS, ShardInfo, SplitDir, image_problem, open_split, reader_for
from fgdist.faults import stall_point
from fgdist.images import open_image, to_rgb

log = logging.getLogger(__name__)

# ImageNet statistics: right for pretrained ResNets and harmless for the small data sets; the
# normalization of a DataConfig without its own (data.mean/std, filled in from the backbone when
# a run config is read; older exports and MLflow models, all ResNet-18s, hold none).
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalization(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per RGB channel that images are normalized with: data.mean/std, else ImageNet's."""
    mean = MEAN if cfg.mean is None else np.asarray(cfg.mean, dtype=np.float32)
    std = STD if cfg.std is None else np.asarray(cfg.std, dtype=np.float32)
    return mean, std


class CorruptSampleError(RuntimeError):
    pass


# -- augmentation with an explicit random generator (resume replays it exactly) -------------
def _crop_flip(img: Image.Image, rng: random.Random, size: int, padding: int) -> Image.Image:
    """Zero-pad, random `size` crop, horizontal flip (the paper's CIFAR recipe)."""
    w, h = img.size
    canvas = Image.new("RGB", (w + 2 * padding, h + 2 * padding))
    canvas.paste(img, (padding, padding))
    x, y = rng.randint(0, canvas.width - size), rng.randint(0, canvas.height - size)
    img = canvas.crop((x, y, x + size, y + size))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def _resized_crop_flip(img: Image.Image, rng: random.Random, size: int) -> Image.Image:
    """RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) + flip (the ImageNet recipe)."""
    img = random_resized_crop(img, rng, size, (0.08, 1.0))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def resize_shorter_side(img: Image.Image, side: int, size: int) -> Image.Image:
    """The shorter side scaled to `side`, the aspect kept, neither side below `size` (the crop to
    come). An image already that size is returned as it is."""
    w, h = img.size
    scale = side / min(w, h)
    target = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if target == img.size else img.resize(target, Image.BILINEAR)


def _center(img: Image.Image, size: int, side: int) -> Image.Image:
    """The evaluation geometry: the shorter side resized to `side`, the central size x size crop."""
    img = resize_shorter_side(img, side, size)
    w, h = img.size
    x, y = (w - size) // 2, (h - size) // 2
    return img if (w, h) == (size, size) else img.crop((x, y, x + size, y + size))


def eval_side(cfg: DataConfig) -> int:
    """The shorter side evaluation resizes an image to before its central image_size crop:
    data.resize for resized_crop_flip (the ImageNet recipe: 256, then 224), image_size otherwise.
    Data already at image_size (CIFAR at 32, Fashion-MNIST at 28) is left as it is."""
    return cfg.resize if cfg.augment == "resized_crop_flip" else cfg.image_size


def make_transform(cfg: DataConfig, train: bool):
    """PIL image (any mode; fgdist.images.to_rgb reads it) + rng -> normalized CHW float tensor.
    crop_flip training scales the shorter side to image_size first, as evaluation does, so an
    image larger than the configured size is seen whole in both (at its native size, a no-op)."""

    side = eval_side(cfg)
    mean, std = normalization(cfg)
    erase_fill = tuple(round(255 * float(v)) for v in mean)  # zero after normalization

    def transform(img: Image.Image, rng: random.Random) -> torch.Tensor:
        single_channel = img.mode in SINGLE_CHANNEL_MODES
        img = to_rgb(img)
        if train and cfg.augment == "crop_flip":
            img = resize_shorter_side(img, cfg.image_size, cfg.image_size)
            img = _crop_flip(img, rng, cfg.image_size, cfg.padding)
        elif train and cfg.augment == "resized_crop_flip":
            img = _resized_crop_flip(img, rng, cfg.image_size)
        elif train and cfg.augment == "strong":
            img = strong_augment(
                img, rng, cfg.image_size, tuple(cfg.crop_scale), single_channel, erase_fill, colour=cfg.colour
            )
        else:
            img = _center(img, cfg.image_size, side)
        array = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    return transform


# -- which samples a (rank, worker) slot reads -----------------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    urls: tuple[str, ...]
    instance_range: tuple[int, int] | None  # keep lo <= id < hi (by_superclass boundaries)
    modulo: tuple[int, int] | None  # keep id % m == k (when there are fewer shards than slots)


def deal(urls: list[str], slot: int, slots: int, instance_range=None) -> StreamSpec:
    """Shards are dealt out over slots; with fewer shards than slots every slot reads all of them
    and keeps the instance ids congruent to its slot."""
    if len(urls) >= slots:
        return StreamSpec(tuple(urls[slot::slots]), instance_range, None)
    return StreamSpec(tuple(urls), instance_range, (slots, slot))


def _seed(*parts: int) -> int:
    """A seed for one stream or sample, the same in every process, run and Python version
    (Python's `hash` promises none of that)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _read(spec: StreamSpec, shard_order_seed: int | None, reader: TarReader):
    """Raw samples (undecoded) of a spec, in shard order shuffled by `shard_order_seed`."""
    urls = list(spec.urls)
    if shard_order_seed is not None:
        random.Random(shard_order_seed).shuffle(urls)
    for sample in reader.samples(urls):
        meta = json.loads(sample["json"])
        iid = meta["instance"]
        if spec.instance_range and not spec.instance_range[0] <= iid < spec.instance_range[1]:
            continue
        if spec.modulo and iid % spec.modulo[0] != spec.modulo[1]:
            continue
        yield sample, meta


def _image_bytes(sample) -> bytes | None:
    return sample.get("png", sample.get("jpg"))


def _decode(sample, meta, transform, rng, on_corrupt):
    data = _image_bytes(sample)
    try:
        if data is None:
            raise OSError("no png or jpg member")
        return transform(open_image(data), rng)
    except DECODE_ERRORS as err:
        if on_corrupt == "fail":
            raise CorruptSampleError(
                f"{sample.get('__url__')}: sample {sample['__key__']}: cannot decode image ({err}); set "
                "data.on_corrupt='skip' to skip such samples"
            ) from None
        return None


def _is_corrupt(sample) -> bool:
    data = _image_bytes(sample)
    return data is None or image_problem(data) is not None


class TrainStream(IterableDataset):
    """The endless, shuffled sample stream of one rank for one epoch."""

    def __init__(
        self,
        specs: list[StreamSpec],
        cfg: DataConfig,
        seed: int,
        epoch: int,
        rank: int,
        skip_batches: int,
        reader: TarReader | None = None,
    ):
        self.specs, self.cfg, self.seed, self.epoch, self.rank, self.skip_batches = (
            specs,
            cfg,
            seed,
            epoch,
            rank,
            skip_batches,
        )
        self.reader = reader or TarReader(cfg.url_retry_seconds)
        self.transform = with_views(make_transform(cfg, train=True), cfg.views)

    def __iter__(self):
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes batches round-robin from its workers, starting at worker 0. Batch j of
        # the epoch belongs to stream j % workers; a loader resumed at step s gets batch s from
        # worker 0, so worker 0 plays stream s % workers, and skips that stream's trained batches.
        worker = (physical + self.skip_batches) % workers
        skip = len(range(worker, self.skip_batches, workers)) * self.cfg.batch_size
        trained = 0  # images of this stream already trained (a resume passes them by)
        skipped_corrupt = 0
        delivered = 0  # images this worker has yielded: batch skip_batches + physical + (n // batch) * workers
        for position, (sample, meta) in enumerate(self._endless(self.specs[worker], worker)):
            if trained < skip:
                # Trained batches held images, not samples: with on_corrupt=skip, an undecodable
                # sample among them took no place, so find it again (decode, no augmentation).
                # With "fail" none can have been passed, and nothing is decoded.
                if self.cfg.on_corrupt == "fail" or not _is_corrupt(sample):
                    trained += 1
                continue
            # One generator per sample position: augmentations do not depend on what was skipped.
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, position))
            image = _decode(sample, meta, self.transform, rng, self.cfg.on_corrupt)
            if image is None:
                skipped_corrupt += 1
                continue
            if delivered % self.cfg.batch_size == 0:
                batch = self.skip_batches + physical + delivered // self.cfg.batch_size * workers
                stall_point(self.rank, self.epoch, batch)
            yield image, meta["super"], meta["fine"], meta["instance"], skipped_corrupt
            skipped_corrupt = 0
            delivered += 1

    def _endless(self, spec, worker):
        """Pass after pass over the spec's samples; each pass is shuffled (shard order and a
        buffer drained at the end of the pass, so one pass yields each sample exactly once)."""
        passes = 0
        while True:
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, passes))
            buffer: list = []
            count = 0
            for item in _read(spec, rng.getrandbits(31), self.reader):
                count += 1
                buffer.append(item)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            if count == 0:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: no samples in {spec.urls[:3]} (instance range "
                    f"{spec.instance_range}, modulo {spec.modulo})"
                )
            passes += 1


def collate(items):
    """A batch of images; with several views per image ([views, C, H, W] items) the views become
    consecutive rows (image 0 view 0, image 0 view 1, ...) with repeated labels."""
    images, supers, fines, instances, corrupt = zip(*items)
    images = torch.stack(images)
    views = images.shape[1] if images.dim() == 5 else 1
    labels = {
        "super": torch.tensor(supers, dtype=torch.long),
        "fine": torch.tensor(fines, dtype=torch.long),
        "instance": torch.tensor(instances, dtype=torch.long),
    }
    return {
        "images": images.flatten(0, 1) if views > 1 else images,
        **{k: v.repeat_interleave(views) for k, v in labels.items()},
        "num_images": len(items),  # images, not rows (images/s)
        "corrupt_skipped": int(sum(corrupt)),
    }


def open_data_split(cfg: DataConfig, split: str, shards: str | None = None) -> SplitDir:
    """A split of the configured shard set (`shards` overrides data.shards; the tars are read from
    data.shards_url when it is set)."""
    return open_split(shards or cfg.shards, split, cfg.shards_url, cfg.url_retry_seconds)


def shard_urls(split: SplitDir, shards: list[ShardInfo]) -> list[str]:
    """Where the shards are read: local paths, or URLs when the split was opened with one."""
    return [split.shard_path(s) for s in shards]


def steps_per_epoch(num_instances: int, world_size: int, batch_size: int) -> int:
    return math.ceil(num_instances / (world_size * batch_size))


def fill_slots(shards: list[tuple[str, int]], capacities: list[int], instance_range=None) -> list[StreamSpec]:
    """Shards (url, samples it holds for these slots) over slots, each holding at most the samples
    its stream delivers in an epoch (`capacities`) where they fit: largest shard first, into the
    slot with the most room left (a slot without a shard first), so an epoch reads every sample
    rather than leaving some in an overfull slot while another repeats its own."""
    if len(shards) < len(capacities):
        return [deal([url for url, _ in shards], k, len(capacities), instance_range) for k in range(len(capacities))]
    room, dealt = list(capacities), [[] for _ in capacities]
    for url, count in sorted(shards, key=lambda shard: -shard[1]):  # stable: equal sizes keep their order
        k = max(range(len(dealt)), key=lambda i: (not dealt[i], room[i], -i))
        dealt[k].append(url)
        room[k] -= count
    return [StreamSpec(tuple(urls), instance_range, None) for urls in dealt]


def rank_specs(
    split: SplitDir, plan: Plan, cfg: DataConfig, rank: int, epoch: int, seed: int, workers: int
) -> list[StreamSpec]:
    """One StreamSpec per DataLoader worker of `rank`. Worker w's stream fills the batches
    j = w, w + workers, ... of the epoch's steps: that many batches' samples is its capacity."""
    steps = steps_per_epoch(split.manifest.num_instances, plan.world_size, cfg.batch_size)
    capacities = [len(range(w, steps, workers)) * cfg.batch_size for w in range(workers)]
    if cfg.routing == "by_superclass":
        lo, hi = plan.column_range(rank)
        shards = plan.shards_for_rank(split.manifest, rank)
        held = [min(s.instance_end, hi) - max(s.instance_begin, lo) for s in shards]
        return fill_slots(list(zip(shard_urls(split, shards), held)), capacities, (lo, hi))
    shards = list(zip(shard_urls(split, split.manifest.shards), [s.count for s in split.manifest.shards]))
    random.Random(_seed(seed, epoch)).shuffle(shards)  # the same deal on every rank
    return fill_slots(shards, capacities * plan.world_size)[rank * workers : (rank + 1) * workers]


def train_batches(split: SplitDir, plan: Plan, cfg: DataConfig, rank: int, epoch: int, seed: int, start_step: int = 0):
    """Exactly steps_per_epoch - start_step batches of this rank's stream for `epoch`, through
    stuck loader workers (`restarting`)."""
    steps = steps_per_epoch(split.manifest.num_instances, plan.world_size, cfg.batch_size)
    workers = max(cfg.num_workers, 1)
    specs = rank_specs(split, plan, cfg, rank, epoch, seed, workers)
    reader = reader_for(split, cfg.url_retry_seconds)

    def loader_at(step: int):
        stream = TrainStream(specs, cfg, seed, epoch, rank, step, reader)
        return itertools.islice(data_loader(stream, cfg, cfg.batch_size, cfg.num_workers), steps - step)

    return restarting(loader_at, start_step, cfg.worker_restarts, f"rank {rank} epoch {epoch + 1} training")


def restarting(loader_at, start: int, restarts: int, what: str):
    """The batches of `loader_at(start)` (a loader from batch `start` on), through stuck workers:
    when one delivers nothing for data.worker_timeout (LoaderWorkerTimeoutError, its workers'
    stacks printed and the workers killed), a new loader takes over at the first batch not yet
    delivered, at most `restarts` times. The batches are the ones the stuck loader would have
    given: every stream is a pure function of its position (what a resume replays too)."""
    position, failures = start, 0
    while True:
        try:
            for batch in loader_at(position):
                yield batch
                position += 1
            return
        except LoaderWorkerTimeoutError as err:
            if failures >= restarts:
                raise
            failures += 1
            log.warning(
                f"{err}; {what} goes on with a new loader at batch {position} (restart {failures} of {restarts})"
            )


class EvalStream(IterableDataset):
    """A rank's slice of a split, decoded once, for embedding. DataLoader workers split the
    rank's shards between them (never more workers than shards): each sample is read once."""

    def __init__(
        self, spec: StreamSpec, cfg: DataConfig, reader: TarReader | None = None, rank: int = 0, batch_size: int = 1
    ):
        self.spec, self.cfg, self.rank, self.batch_size = spec, cfg, rank, batch_size
        self.reader = reader or TarReader(cfg.url_retry_seconds)
        self.transform = make_transform(cfg, train=False)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        spec = StreamSpec(self.spec.urls[worker::workers], self.spec.instance_range, self.spec.modulo)
        for delivered, (sample, meta) in enumerate(_read(spec, None, self.reader)):
            if delivered % self.batch_size == 0:  # the batch it starts, while the workers take turns
                stall_point(self.rank, "eval", worker + delivered // self.batch_size * workers)
            image = _decode(sample, meta, self.transform, None, "fail")
            yield image, meta["super"], meta["fine"], meta["instance"], 0


def eval_batches(split: SplitDir, cfg: DataConfig, batch_size: int, rank: int, world_size: int):
    urls = shard_urls(split, split.manifest.shards)
    return _eval_loader(split, deal(urls, rank, world_size), cfg, batch_size, rank)


def own_column_batches(split: SplitDir, plan: Plan, cfg: DataConfig, batch_size: int, rank: int):
    """Each training image whose instance column `rank` owns, once, with the evaluation transform
    (head.init=features). The by_superclass reader whatever the routing: the rank that writes a
    column reads its image, so no rows cross ranks, split super-classes included."""
    urls = shard_urls(split, plan.shards_for_rank(split.manifest, rank))
    return _eval_loader(split, deal(urls, 0, 1, plan.column_range(rank)), cfg, batch_size, rank)


def _eval_loader(split: SplitDir, spec: StreamSpec, cfg: DataConfig, batch_size: int, rank: int):
    """Every sample of `spec` once, with the evaluation transform; each worker reads its own shards.
    A new loader after a stuck worker reads the batches already delivered again and passes them
    (the batch order is fixed: workers take turns)."""
    stream = EvalStream(spec, cfg, reader_for(split, cfg.url_retry_seconds), rank, batch_size)
    workers = min(cfg.num_workers, len(spec.urls))

    def loader_at(batch: int):
        return itertools.islice(data_loader(stream, cfg, batch_size, workers), batch, None)

    return restarting(loader_at, 0, cfg.worker_restarts, f"rank {rank} evaluation")


class LoaderWorkerTimeoutError(RuntimeError):
    pass


def _stacks_on_sigusr1(_worker_id: int) -> None:
    """In each loader worker: SIGUSR1 prints every thread's Python stack to stderr (the rank's log)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


class WatchedLoader(DataLoader):
    """A DataLoader whose workers must deliver each batch within its timeout (data.worker_timeout):
    a stuck worker becomes an error on its rank (which `restarting` answers with a new loader)
    instead of a silent hang of every rank. Before the error, each worker prints where it waits
    (the stuck worker of issue 22 was never caught in the act; bench/RESULTS.md, its stress
    loops), the workers are shut down, and the error names the rank and the workers' pids."""

    def __iter__(self):
        iterator = super().__iter__()
        try:
            yield from iterator
        except RuntimeError as err:
            if not self.timeout or "timed out" not in str(err):
                raise
            pids = [w.pid for w in getattr(iterator, "_workers", [])]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
            time.sleep(1.0)  # time to write the stacks before the workers are shut down
            _kill_workers(iterator)
            raise LoaderWorkerTimeoutError(
                f"rank {os.environ.get('RANK', 0)}: a loader worker (pids {pids}) delivered no batch for "
                f"{self.timeout:g} s (data.worker_timeout); the workers' stacks are printed above"
            ) from None


def _kill_workers(iterator) -> None:
    """End a multi-process DataLoader iterator's workers now (a stuck one would hold PyTorch's own
    shutdown for its 5 s join). They leave PyTorch's SIGCHLD watch first: its handler raises
    wherever the rank happens to be when a worker it still watches dies."""
    if iterator._worker_pids_set:
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in iterator._workers:
        worker.kill()
        worker.join()
    iterator._shutdown_workers()  # its queues and events; the workers are gone, nothing waits


def data_loader(stream: IterableDataset, cfg: DataConfig, batch_size: int, workers: int) -> DataLoader:
    """A WatchedLoader of `stream` with `workers` worker processes."""
    timeout = cfg.worker_timeout if workers else 0  # PyTorch allows a timeout only with workers
    init = _stacks_on_sigusr1 if workers else None
    return WatchedLoader(
        stream, batch_size=batch_size, num_workers=workers, collate_fn=collate, timeout=timeout, worker_init_fn=init
    )
