"""Train one stage of the GLR 2020 3rd-place pipeline (sub-center ArcFace, dynamic margins).

Launch as one process (`python train.py ...`), or data-parallel with
`torchrun --nproc_per_node=N train.py ...` / `python -m torch.distributed.launch
--nproc_per_node=N train.py ...` (NCCL on GPUs, gloo on CPU). The flags and
defaults are the original repo's, so its README commands run as written.
"""
import argparse
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from finetune import RECIPES, Reader, apply_recipe, init_neck_and_head
from dataset import EpochSampler, LandmarkDataset, collate, drop_excluded, get_df, get_transforms, worker_init
from losses import ArcFaceLossAdaptiveMargin, dynamic_margins
from models import MissingWeights, build_model, check_enet_type, preprocessing_for
from evaluate import global_average_precision_score
from plot_logs import read_log
from util import (ArgumentParser, UserError, cleanup_distributed, cpu_budget, get_lr, is_main,
                  load_fitting, load_state_dict_file, memory_format, print0, run_main, save_checkpoint,
                  setup_distributed, torch_load)

VALID_STRIDE = 15  # the original validates on every 15th row of the held-out fold
MIN_VALID = 30     # fewer validation images than this: the curves are noise (a warning says so)


def parse_args(argv=None):
    # allow_abbrev=False: a prefix such as --n-epoch must not silently mean --n-epochs
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    # --- the original's flags, same names and defaults
    p.add_argument("--kernel-type", type=str, required=True)
    p.add_argument("--data-dir", type=str, default="/raid/GLD2")
    p.add_argument("--train-step", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--enet-type", type=str, required=True)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--num-workers", type=int, default=32, help="data loader workers per process")
    p.add_argument("--init-lr", type=float, default=1e-4)
    p.add_argument("--n-epochs", type=int, default=15)
    p.add_argument("--start-from-epoch", type=int, default=1)
    p.add_argument("--stop-at-epoch", type=int, default=999)
    p.add_argument("--DEBUG", action="store_true", help="a few batches per epoch")
    p.add_argument("--model-dir", type=str, default="./weights")
    p.add_argument("--log-dir", type=str, default="./logs")
    p.add_argument("--CUDA_VISIBLE_DEVICES", type=str, default=None,
                   help="GPUs to use, e.g. 0,1 (the original defaulted to 0,...,7; unset keeps the environment's)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--load-from", type=str, default="", help="weights to start from (optimizer not restored)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch; LOCAL_RANK from the environment wins")
    p.add_argument("--use-amp", action="store_true",
                   help="deprecated: in the original this flag turned mixed precision OFF; use --amp off")
    # --- additions
    p.add_argument("--amp", choices=["auto", "fp16", "bf16", "off"], default="auto",
                   help="auto: bf16 where the GPU supports it, else fp16 with a grad scaler; off on CPU")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ImageNet weights (the original always did at step 0)")
    p.add_argument("--pretrained-path", type=str, default=None, help="ImageNet weights file for the backbone")
    p.add_argument("--pool", choices=["avg", "gem"], default="avg",
                   help="global pooling of CNN backbones: avg (the original) or GeM with a learnt p (init 3)")
    p.add_argument("--folds-csv", type=str, default="train_0.csv", help="clean list with folds (preprocess.py)")
    p.add_argument("--save-epochs", type=str, default="", help="e.g. 28,36: also keep _ep28.pth, _ep36.pth")
    p.add_argument("--resume", type=str, default="",
                   help="checkpoint of ours (weights, optimizer, scaler, epoch) to continue from; 'auto': this run's "
                        "own {model_dir}/{kernel_type}_fold{fold}.pth if it exists, else a fresh start")
    p.add_argument("--seed", type=int, default=0, help="sampler order and augmentations")
    p.add_argument("--log-interval", type=int, default=50, help="steps between progress-bar loss updates")
    p.add_argument("--checkpoint-every-steps", type=int, default=0, metavar="N",
                   help="also write {kernel}_fold{f}_step.pth every N steps, which --resume auto continues "
                        "from mid-epoch (for long epochs: step 0 sees 4.1 M images per epoch)")
    p.add_argument("--dist-timeout", type=float, default=30,
                   help="minutes a collective may wait for the other ranks before the run fails (a dead rank)")
    p.add_argument("--max-bad-frac", type=float, default=0.01,
                   help="stop when more than this share of an epoch's images is unreadable (they are skipped)")
    p.add_argument("--exclude", type=str, default="",
                   help="CSV of images to leave out up front (column id or path: preprocess.py --check-images)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a --kernel-type again whose log or checkpoints exist (they are replaced)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle --load-from/--resume files in full, objects included (only for files you trust)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training step (default backend inductor; minutes of compilation at "
                        "the start of a stage)")
    p.add_argument("--valid-stride", type=int, default=VALID_STRIDE, metavar="K",
                   help="validate on every K-th row of the held-out fold (the original's 15); 0: no validation "
                        "and no held-out fold, every image trains")
    # --- fine-tuning a pretrained model on a small or new data set (finetune.py, docs/transfer.md)
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="finetune: the preset below for a small or new data set, wherever a flag is not given")
    p.add_argument("--warmup-factor", type=float, default=10.0,
                   help="epochs 2-3 run at this times --init-lr (the original's x10 warm-up)")
    p.add_argument("--freeze-backbone-epochs", type=int, default=0, metavar="N",
                   help="for the first N epochs the backbone gets no gradient and runs in eval mode (batch norm "
                        "on its loaded statistics); the neck and head train")
    p.add_argument("--backbone-lr-mult", type=float, default=1.0, metavar="F",
                   help="the backbone's learning rate is F times the schedule's (neck, GeM p and head: 1x)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="the backbone's batch-norm statistics and affine weights stay as loaded all run")
    p.add_argument("--init-neck", choices=["random", "pca"], default="random",
                   help="pca: the neck starts as the PCA whitening of the training images' pooled features "
                        "(random: as built, or as loaded by --load-from)")
    p.add_argument("--init-head", choices=["random", "imprint"], default="random",
                   help="imprint: each class's sub-centres start at its training images' embeddings")
    p.add_argument("--init-samples", type=int, default=20000, metavar="N",
                   help="--init-neck pca reads at most N training images")
    p.add_argument("--init-samples-per-class", type=int, default=10, metavar="N",
                   help="--init-head imprint reads at most N images per class")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    # the flags the user gave: a --recipe sets only the others
    args.explicit = sorted({a.dest for a in p._actions for tok in argv for o in a.option_strings
                            if tok == o or tok.startswith(o + "=")})
    if args.use_amp:
        warnings.warn("--use-amp is the original's flag and turned mixed precision OFF there; it does so "
                      "here too. Use --amp off to say so explicitly.")
        args.amp = "off"
    args.save_epochs = sorted({int(e) for e in args.save_epochs.split(",") if e.strip()})
    args.recipe_values = apply_recipe(args, set(args.explicit))
    return args


def check_args(args):
    """The user's flags, checked before any data is read or model built: a
    mistake ends as one line (UserError) instead of a traceback hours later."""
    for flag, v in (("--image-size", args.image_size), ("--batch-size", args.batch_size),
                    ("--n-epochs", args.n_epochs), ("--start-from-epoch", args.start_from_epoch)):
        if v <= 0:
            raise UserError(f"{flag} {v}: must be positive")
    if not 0 <= args.max_bad_frac <= 1:
        raise UserError(f"--max-bad-frac {args.max_bad_frac}: must be between 0 and 1")
    if args.checkpoint_every_steps < 0:
        raise UserError(f"--checkpoint-every-steps {args.checkpoint_every_steps}: must be >= 0 (0: off)")
    if args.num_workers < 0:
        raise UserError(f"--num-workers {args.num_workers}: must be >= 0")
    for flag, v in (("--valid-stride", args.valid_stride), ("--freeze-backbone-epochs", args.freeze_backbone_epochs),
                    ("--backbone-lr-mult", args.backbone_lr_mult), ("--warmup-factor", args.warmup_factor)):
        if v < 0:
            raise UserError(f"{flag} {v}: must be >= 0")
    for flag, v in (("--init-samples", args.init_samples), ("--init-samples-per-class", args.init_samples_per_class)):
        if v <= 0:
            raise UserError(f"{flag} {v}: must be positive")
    if args.stop_at_epoch < args.start_from_epoch:
        raise UserError(f"--stop-at-epoch {args.stop_at_epoch} is before --start-from-epoch {args.start_from_epoch}")
    for flag, path in (("--load-from", args.load_from), ("--resume", "" if args.resume == "auto" else args.resume),
                       ("--pretrained-path", args.pretrained_path), ("--exclude", args.exclude)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")
    check_enet_type(args.enet_type)
    stem = os.path.join(args.model_dir, f"{args.kernel_type}_fold{args.fold}")
    log_file = os.path.join(args.log_dir, f"{args.kernel_type}.txt")
    old = [p for p in (log_file, f"{stem}.pth", f"{stem}_final.pth") if os.path.exists(p)]
    if old and not args.resume and not args.overwrite:
        raise UserError(f"--kernel-type {args.kernel_type}: {old[0]} exists from an earlier run; pass --resume auto "
                        f"to continue it, --overwrite to start it again, or choose another --kernel-type")


def resolve_amp(amp, device):
    """(enabled, dtype, use_grad_scaler) for the --amp choice on this device."""
    if device.type != "cuda":
        if amp == "fp16":
            warnings.warn("fp16 autocast needs a GPU; running in float32")
        return (amp == "bf16", torch.bfloat16, False)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (amp != "off", torch.float16 if amp == "fp16" else torch.bfloat16, amp == "fp16")


def convert_sync_batchnorm(model):
    """BatchNorm -> SyncBatchNorm, keeping timm's fused BatchNormAct2d (norm +
    activation) intact: torch's own converter rebuilds those as a plain
    SyncBatchNorm and drops their activation."""
    from timm.layers import convert_sync_batchnorm as timm_convert
    return timm_convert(model)


def load_weights(model, path, train_step, trust=False):
    """--load-from: weights only, as the original. At step 1 the class set
    changes (full -> clean classes), so the ArcFace head is re-initialised.
    --pool gem from weights pooled by averaging: GeM's p starts at its init."""
    sd = load_state_dict_file(path, trust=trust)
    if model.pool is not None and "pool.p" not in sd:
        print0(f"--pool gem: {path} has no GeM p (it was trained with average pooling); p starts at "
               f"{model.pool.p.item():g}")
        sd = {**sd, "pool.p": model.pool.p.detach().clone()}
    load_fitting(model, sd, path, skip=("metric_classify.weight",) if train_step == 1 else ())


def train_one_epoch(args, t, loader, bad_images=None, start_step=0, start_totals=None, on_step=None):
    """One epoch of steps of t (build_training's namespace: train_model, train_criterion,
    optimizer, scaler, autocast, device, memory_format, progress); returns the mean loss over the
    finite-loss steps and the number of non-finite ones. Batches are (x, y) or, from a
    LandmarkDataset with skip_bad, (x, y, bad paths per sample): those paths are appended to
    `bad_images`. A run resumed mid-epoch passes the steps done and their (loss sum, finite,
    non-finite) totals; on_step(steps done, totals) runs after every step."""
    model, device, optimizer, scaler = t.train_model, t.device, t.optimizer, t.scaler
    model.train()
    totals = torch.zeros(3, device=device) if start_totals is None else start_totals.to(device).clone()
    loss_sum, n_ok, n_bad = totals[0], totals[1], totals[2]  # views: updated in place
    bar = tqdm(loader, disable=not (t.progress and is_main()), mininterval=1.0)
    for step, (x, y, *bad) in enumerate(bar, start=start_step):
        if bad and bad_images is not None:
            bad_images.extend(p for paths in bad[0] if paths for p in paths.split("\n"))
        x = x.to(device, non_blocking=True, memory_format=t.memory_format)
        y = y.to(device, non_blocking=True)
        with t.autocast():
            logits = model(x)
        loss = t.train_criterion(logits, y)  # float32, outside autocast
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skips the update when fp16 grads overflowed
        scaler.update()
        ok = torch.isfinite(loss.detach())  # recorded on the device: no host sync here
        loss_sum += torch.where(ok, loss.detach(), 0.0)
        n_ok += ok
        n_bad += ~ok
        if t.progress and is_main() and (step + 1) % args.log_interval == 0:
            # sync point: one .item() per log interval for the progress bar
            bar.set_postfix(loss=f"{(loss_sum / n_ok.clamp_min(1)).item():.5f}")
        if on_step is not None:
            on_step(step + 1, totals)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, n_ok, n_bad = totals.tolist()  # sync point: end of epoch
    return loss_sum / max(n_ok, 1), int(n_bad)


def latest_checkpoint(stem, trust=False):
    """For --resume auto: {stem}_step.pth (mid-epoch) when it is ahead of {stem}.pth
    (the last complete epoch), else {stem}.pth, else '' (nothing to resume)."""
    done, mid = f"{stem}.pth", f"{stem}_step.pth"

    def epoch(path):  # memory-mapped: the epoch without the weights and Adam's state (GBs at 81,313 classes)
        return torch_load(path, trust=trust, mmap=True)["epoch"]
    if os.path.isfile(mid):
        if not os.path.isfile(done) or epoch(mid) >= epoch(done):
            return mid
    return done if os.path.isfile(done) else ""


def check_finite(model, epoch, n_nonfinite, n_steps, scaler_on):
    """After an epoch: with the fp16 grad scaler a step with a non-finite loss was
    skipped (normal; counted). Otherwise (bf16, fp32) such a step, or weights
    that are no longer finite, end the run here, before this epoch's checkpoint
    is written: the last good one stays."""
    # sync point: once per epoch, every parameter
    weights_ok = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if weights_ok and (not n_nonfinite or scaler_on):
        if n_nonfinite:
            print0(f"epoch {epoch}: the grad scaler skipped {n_nonfinite} of {n_steps} steps (fp16 overflow)")
        return
    what = "the weights are no longer finite" if not weights_ok else "the loss was not finite"
    raise SystemExit(f"train.py: stopped in epoch {epoch}: {what} ({n_nonfinite} of {n_steps} steps had a "
                     f"non-finite loss). No checkpoint of this epoch was written; the last good one is kept. "
                     f"Try a lower --init-lr, or --amp fp16 (its grad scaler skips such steps).")


def print_summary(log_file, final, n_train, t_train, wall):
    """The end of a stage in one block: best validation GAP (over the whole log,
    resumed epochs included), the final checkpoint, throughput and wall time."""
    rows = read_log(log_file) if os.path.exists(log_file) else []
    best = max((r for r in rows if r["gap"] == r["gap"]), key=lambda r: r["gap"], default=None)  # nan: not validated
    h, m = divmod(int(wall) // 60, 60)
    print(f"summary: best gap_m {best['gap']:.6f} at epoch {best['epoch']} (acc_m {best['acc']:.2f})"
          if best else "summary: no epoch was validated", flush=True)
    print(f"summary: final checkpoint {final}; {n_train / max(t_train, 1e-9):.1f} images/s in training steps "
          f"(all ranks, loading included); wall time {h}h{m:02d}m{int(wall) % 60:02d}s; "
          f"curves: python plot_logs.py {log_file}", flush=True)


def report_bad_images(args, epoch, bad, n_seen, world_size):
    """Skipped images of one epoch, summed over ranks: rank 0 prints how many
    and the first few, and appends them to {log_dir}/{kernel_type}_bad_images.txt.
    More than --max-bad-frac of the epoch unreadable stops the run (every rank
    sees the same totals, so all stop together)."""
    parts = [(bad[:1000], len(bad), n_seen)]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, (bad[:1000], len(bad), n_seen))  # once per epoch
    paths = [p for part in parts for p in part[0]]
    n_bad, total = sum(p[1] for p in parts), sum(p[2] for p in parts)
    if n_bad and is_main():
        log = os.path.join(args.log_dir, f"{args.kernel_type}_bad_images.txt")
        with open(log, "a") as f:
            f.writelines(f"epoch {epoch}\t{p}\n" for p in paths)
        print0(f"epoch {epoch}: skipped {n_bad} unreadable images of {total} "
               f"(replaced by others), e.g. {', '.join(paths[:3])}; listed in {log}")
    if total and n_bad / total > args.max_bad_frac:
        raise UserError(f"{n_bad} of {total} images of epoch {epoch} were unreadable (more than --max-bad-frac "
                        f"{args.max_bad_frac}): the data set is broken, not a few files; see "
                        f"{os.path.join(args.log_dir, args.kernel_type + '_bad_images.txt')} and "
                        f"`python preprocess.py --check-images`")


def loader_kwargs(args, device):
    """DataLoader settings shared by the training and validation loaders."""
    kw = {"batch_size": args.batch_size, "num_workers": args.num_workers, "pin_memory": device.type == "cuda",
          "collate_fn": collate}
    if args.num_workers > 0:
        # workers live for the whole run (no re-spawn and re-import each epoch) and keep
        # a few batches ready per worker; one OpenCV thread each
        kw |= {"persistent_workers": True, "prefetch_factor": 4, "worker_init_fn": worker_init}
    return kw


def validation_loader(args, dataset, device, rank, world_size):
    """The validation rows sharded across ranks: rank r scores rows r, r+W, ...;
    returns (loader, the row indices it scores)."""
    idx = list(range(rank, len(dataset), world_size))
    return DataLoader(Subset(dataset, idx), **loader_kwargs(args, device)), idx


@torch.no_grad()
def validate(model, loader, idx, criterion, autocast, device, world_size):
    """Loss, accuracy (%) and GAP on the validation rows.

    Each rank scores its shard (validation_loader) and the results are
    gathered on every rank: each row is scored exactly once.
    """
    model.eval()
    if world_size > 1:
        # Batch-norm running stats differ per rank after training (DDP broadcasts
        # rank 0's only at the next forward; CPU has no SyncBatchNorm): score every
        # shard with rank 0's, the weights that the checkpoint holds.
        for b in model.buffers():
            dist.broadcast(b, src=0)
    out = {k: [] for k in ("loss", "conf", "pred", "target")}
    for x, y, *_ in tqdm(loader, disable=not is_main(), mininterval=1.0):
        x = x.to(device, non_blocking=True, memory_format=memory_format(device))
        y = y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        conf, pred = logits.float().max(1)
        out["loss"].append(criterion(logits, y, reduction="none"))
        out["conf"].append(conf)
        out["pred"].append(pred)
        out["target"].append(y)
    local = {k: (torch.cat(v).cpu().numpy() if v else np.zeros(0)) for k, v in out.items()}
    local["index"] = np.asarray(idx)
    parts = [local]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, local)
    res = {k: np.concatenate([p[k] for p in parts]) for k in local}
    order = np.argsort(res["index"], kind="stable")  # back to row order: GAP breaks ties by it
    res = {k: v[order] for k, v in res.items()}
    if len(res["index"]) == 0:
        return float("nan"), float("nan"), float("nan")
    acc = float((res["pred"] == res["target"]).mean() * 100)
    gap = global_average_precision_score(list(res["target"]), list(zip(res["pred"], res["conf"])))
    return float(res["loss"].mean()), acc, gap


def param_groups(model, lr, backbone_lr_mult=1.0, neck_group=False):
    """Adam's parameter groups: one (the original's) when every parameter trains at
    the schedule's rate, else the backbone's, the neck's (with neck_group: its rate
    follows its --init-neck pca scale) and the rest's (GeM p, head), each with
    its `lr_mult`, which the optimizer's state dict keeps for --resume."""
    if backbone_lr_mult == 1.0 and not neck_group:
        return [{"params": list(model.parameters()), "lr": lr, "lr_mult": 1.0, "name": "all"}]
    groups = [("backbone", list(model.enet.parameters()), backbone_lr_mult)]
    if neck_group:
        groups.append(("neck", list(model.feat.parameters()), 1.0))
    taken = {id(p) for _, params, _ in groups for p in params}
    groups.append(("head", [p for p in model.parameters() if id(p) not in taken], 1.0))
    return [{"params": params, "name": name, "lr_mult": mult, "lr": lr * mult} for name, params, mult in groups]


def set_lr(optimizer, lr):
    """The schedule's rate, times each group's lr_mult (an old checkpoint's single group has none: 1)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def build_training(args, model, margins, device):
    """Everything a training step needs, around a built model: the model on the
    device (SyncBatchNorm under DDP on GPUs; channels-last), the module
    the step calls (DDP-wrapped, and compiled with --compile), the loss, Adam,
    the grad scaler and the autocast context. train.main and scripts/bench.py
    train both build their step here. Returns a namespace with model,
    train_model, criterion (eager, for validation), train_criterion (compiled
    with --compile), optimizer, scaler, autocast, device, memory_format (of
    the inputs; bench.py train --compare-format sets another), progress (the
    progress bar; off in timed runs), and wrap(): DDP and compile built again
    around `model` after its trainable parameters changed (the end of
    --freeze-backbone-epochs)."""
    if device.type == "cuda" and dist.is_initialized() and not getattr(args, "freeze_bn", False):
        # SyncBatchNorm has no CPU kernel: CPU keeps BatchNorm. Frozen batch norm
        # (--freeze-bn) runs on its loaded statistics: nothing to synchronise.
        model = convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format(device))
    criterion = ArcFaceLossAdaptiveMargin(margins, s=80.0).to(device)
    # fused: one kernel for all parameters on GPUs (the same update as the per-parameter loop)
    optimizer = torch.optim.Adam(param_groups(model, args.init_lr, getattr(args, "backbone_lr_mult", 1.0),
                                              getattr(args, "init_neck", "random") == "pca"),
                                 lr=args.init_lr, fused=device.type == "cuda")
    amp_on, amp_dtype, use_scaler = resolve_amp(args.amp, device)
    if amp_on and device.type == "cuda":
        # TF32 for the float32 matmuls left under AMP: the ArcFace head, which runs
        # outside autocast (models.ArcMarginProductSubcenter); TF32's 10-bit mantissa
        # equals fp16's, the precision the original's apex O1 gave that matmul.
        torch.set_float32_matmul_precision("high")
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_on else nullcontext()

    def wrap():
        train_model = model
        if dist.is_initialized():
            # DDP syncs the parameters that require a gradient when it is built
            train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            # Only the training step is compiled, with static shapes (the loader drops the last
            # partial batch). Validation calls the eager `model`: its eval mode, no_grad and
            # ragged last batch would each be a recompilation, every epoch.
            train_model = torch.compile(train_model, dynamic=False, backend=args.compile)
        return train_model

    train_criterion = torch.compile(criterion, dynamic=False, backend=args.compile) if args.compile else criterion
    return SimpleNamespace(model=model, train_model=wrap(), criterion=criterion, train_criterion=train_criterion,
                           optimizer=optimizer, scaler=scaler, autocast=autocast, wrap=wrap, device=device,
                           memory_format=memory_format(device), progress=True)


def main(argv=None):
    """One stage: set-up, data, model and inits, resume, epochs, finish."""
    args = parse_args(argv)
    check_args(args)
    run = set_up(args)
    try:
        data = build_data(args, run)
        t = build_model_and_inits(args, run, data)
        start = resume(args, t)
        log = open_log(args, run, data)
        epoch, timing = run_epochs(args, run, data, t, start, log)
        finish(args, t, epoch, log, timing)
    finally:
        cleanup_distributed()


def set_up(args):
    """The process: its rank and device (torchrun's environment, or one process), its share of
    the cores, the seed. Returns a namespace rank, world_size, device."""
    if args.CUDA_VISIBLE_DEVICES:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.CUDA_VISIBLE_DEVICES  # before CUDA initialises
    rank, local_rank, world_size, device = setup_distributed(args.local_rank, args.dist_timeout)
    args.local_rank = local_rank
    workers, threads = cpu_budget(args.num_workers)
    if workers < args.num_workers:
        print0(f"--num-workers {args.num_workers}: this process's share of the cores is {workers}; using {workers}")
        args.num_workers = workers
    if "OMP_NUM_THREADS" not in os.environ:  # a user's (or torchrun's) setting wins
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)  # same head initialisation on every rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return SimpleNamespace(rank=rank, world_size=world_size, device=device)


def build_data(args, run):
    """The stage's images and labels (get_df), the dynamic margins, the train/validation split and
    their loaders. Sets args.preprocessing (what the backbone's weights expect)."""
    df, out_dim = get_df(args.kernel_type, args.data_dir, args.train_step, args.folds_csv)
    folds = sorted(int(f) for f in df["fold"].dropna().unique())
    if args.fold not in folds:
        raise UserError(f"--fold {args.fold}: {args.folds_csv} has folds {folds}")
    print0(f"out_dim = {out_dim}, {len(df)} images, world size {run.world_size}, device {run.device}")
    # margins from the whole frame of the stage, validation rows included (as the original)
    margins = dynamic_margins(np.bincount(df["landmark_id"].to_numpy(), minlength=out_dim))

    # the input the backbone's weights expect (the original's backbones: exactly the original's)
    args.preprocessing = preprocessing_for(args.enet_type, args.pretrained_path)
    transforms_train, transforms_val = get_transforms(args.image_size, args.preprocessing["interpolation"])
    # --exclude after the margins and labels: they stay those of the whole list, as the original's
    df, n_excluded = drop_excluded(df, args.exclude)
    if n_excluded:
        print0(f"left out {n_excluded} images listed in {args.exclude}")
    df_train, df_valid = split(args, df, run.world_size)
    dataset_train = LandmarkDataset(df_train, "train", "train", transforms_train, seed=args.seed, rank=run.rank,
                                    skip_bad=True)
    dataset_valid = LandmarkDataset(df_valid, "train", "val", transforms_val, skip_bad=True)
    # (epoch, index) pairs: the persistent workers seed each epoch's augmentations from them
    sampler = EpochSampler(DistributedSampler(dataset_train, num_replicas=run.world_size, rank=run.rank,
                                              shuffle=True, seed=args.seed))
    train_loader = DataLoader(dataset_train, sampler=sampler, drop_last=True, **loader_kwargs(args, run.device))
    valid_loader, valid_idx = validation_loader(args, dataset_valid, run.device, run.rank, run.world_size)
    return SimpleNamespace(out_dim=out_dim, margins=margins, df_train=df_train, transforms_val=transforms_val,
                           sampler=sampler, train_loader=train_loader, valid_loader=valid_loader, valid_idx=valid_idx)


def split(args, df, world_size):
    """(training rows, validation rows): the held-out fold's every --valid-stride-th row validates."""
    if args.valid_stride:
        df_train = df[df["fold"] != args.fold]  # NaN fold (not in the clean list): always training
        df_valid = df[df["fold"] == args.fold].reset_index(drop=True).iloc[::args.valid_stride]
    else:  # --valid-stride 0: no held-out fold, every image trains
        df_train, df_valid = df, df.iloc[:0]
    if args.DEBUG:
        df_train = df_train.sample(min(len(df_train), args.batch_size * world_size * 5), random_state=args.seed)
        df_valid = df_valid.iloc[:args.batch_size * 5]
    if args.recipe_values:
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        given = [flag(k) for k in args.explicit if k in RECIPES[args.recipe]]
        print0(f"--recipe {args.recipe}: " + " ".join(flag(k) + ("" if v is True else f" {v}")
                                                      for k, v in args.recipe_values.items())
               + (f" (given: {' '.join(given)})" if given else ""))
    if not args.valid_stride:
        print0("--valid-stride 0: no validation, every image trains (the logged valid figures are nan)")
    elif len(df_valid) < MIN_VALID:
        print0(f"warning: only {len(df_valid)} images are validated (fold {args.fold}, every {args.valid_stride}-th): "
               f"the validation figures will jump; --valid-stride 1 validates the whole fold, 0 trains on it")
    return df_train, df_valid


def frozen(args, epoch):
    """(backbone, batch norm) frozen in this epoch."""
    return epoch <= args.freeze_backbone_epochs, args.freeze_bn


def build_model_and_inits(args, run, data):
    """The model (pretrained, --load-from or, resumed, whatever: the checkpoint overwrites it), its
    frozen parts, build_training's step around it, and --init-neck/--init-head (a new run only).
    Resolves --resume auto. Returns build_training's namespace, with stem (the checkpoints' path
    prefix)."""
    stem = os.path.join(args.model_dir, f"{args.kernel_type}_fold{args.fold}")
    if args.resume == "auto":
        # the same command line after a kill or pre-emption continues where it stopped: from the
        # mid-epoch checkpoint (--checkpoint-every-steps) when it is newer than the last epoch's
        args.resume = latest_checkpoint(stem, args.trust_checkpoint)
        print0(f"--resume auto: {'continuing from ' + args.resume if args.resume else 'no checkpoint yet, starting'}")
    pretrained = args.pretrained and not args.load_from and not args.resume
    try:
        model = build_model(args.enet_type, data.out_dim, pretrained=pretrained, pretrained_path=args.pretrained_path,
                            pool=args.pool, preprocessing=args.preprocessing, image_size=args.image_size)
    except MissingWeights as e:
        raise UserError(f"{e}, or train from scratch with --no-pretrained") from None
    if args.load_from and not args.resume:  # a resumed run has its own weights
        load_weights(model, args.load_from, args.train_step, args.trust_checkpoint)
    model.set_frozen(*frozen(args, args.start_from_epoch))  # before DDP is built: it syncs what trains
    t = build_training(args, model, data.margins, run.device)
    if not args.resume and (args.init_neck != "random" or args.init_head != "random"):
        reader = Reader(data.transforms_val, run.device, args.batch_size, args.num_workers, t.autocast, run.rank,
                        run.world_size)
        neck_mult = init_neck_and_head(t.model, data.df_train, reader, args)
        if neck_mult is not None:  # --init-neck pca: the neck has its own group (param_groups)
            next(g for g in t.optimizer.param_groups if g["name"] == "neck")["lr_mult"] = neck_mult
    t.stem = stem
    return t


def resume(args, t):
    """--resume: the weights, optimizer, scaler and epoch of a checkpoint of train.py. Returns (the
    steps of the epoch already done, their loss totals) for a mid-epoch checkpoint, else (0, None);
    sets args.start_from_epoch."""
    if not args.resume:
        return 0, None
    ckpt = torch_load(args.resume, map_location=t.device, trust=args.trust_checkpoint)
    if not isinstance(ckpt, dict) or not {"model_state_dict", "optimizer_state_dict", "epoch"} <= set(ckpt):
        raise UserError(f"{args.resume}: not a checkpoint of train.py (--resume needs its weights, "
                        f"optimizer and epoch; --load-from takes weights alone)")
    load_fitting(t.model, ckpt["model_state_dict"], args.resume)
    groups = len(ckpt["optimizer_state_dict"]["param_groups"])
    if groups != len(t.optimizer.param_groups):
        raise UserError(f"--resume {args.resume}: its optimizer has {groups} parameter group(s), this run "
                        f"{len(t.optimizer.param_groups)}: resume with the --backbone-lr-mult and --init-neck it "
                        f"was trained with ({ckpt.get('args', {}).get('backbone_lr_mult', 1.0)}, "
                        f"{ckpt.get('args', {}).get('init_neck', 'random')})")
    t.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    if ckpt.get("scaler_state_dict"):
        t.scaler.load_state_dict(ckpt["scaler_state_dict"])
    args.start_from_epoch = ckpt["epoch"] + 1
    start_step, start_totals = 0, None
    if ckpt.get("step"):  # a mid-epoch checkpoint: continue that epoch after its last saved step
        start_step, start_totals = int(ckpt["step"]), ckpt["totals"] if is_main() else None
    print0(f"resumed from {args.resume} at epoch {args.start_from_epoch}"
           + (f", step {start_step + 1}" if start_step else ""))
    return start_step, start_totals


def open_log(args, run, data):
    """The stage's log file (a new one for a new run of the kernel) and, on rank 0, its args as JSON
    beside it. Returns a namespace file, args (as recorded in checkpoints), out_dim."""
    os.makedirs(args.model_dir, exist_ok=True)
    os.makedirs(args.log_dir, exist_ok=True)
    log_file = os.path.join(args.log_dir, f"{args.kernel_type}.txt")
    if args.overwrite and not args.resume and is_main() and os.path.exists(log_file):
        os.remove(log_file)  # a new run of this kernel: a new log
    args_dict = vars(args).copy()
    if is_main():
        with open(os.path.join(args.log_dir, f"{args.kernel_type}_args.json"), "w") as f:
            json.dump({**args_dict, "world_size": run.world_size, "out_dim": data.out_dim}, f, indent=1)
    return SimpleNamespace(file=log_file, args=args_dict, out_dim=data.out_dim)


def checkpoint_of(t, epoch, log):
    return {"epoch": epoch, "model_state_dict": t.model.state_dict(),
            "optimizer_state_dict": t.optimizer.state_dict(), "scaler_state_dict": t.scaler.state_dict(),
            "args": log.args, "out_dim": log.out_dim}


def run_epochs(args, run, data, t, start, log):
    """The epochs from --start-from-epoch to --n-epochs (or --stop-at-epoch): the schedule's rate,
    the backbone unfrozen on time, an epoch of steps (mid-epoch checkpoints with
    --checkpoint-every-steps), the checks, validation, the log line and the epoch's checkpoint.
    Returns (the last epoch, (wall start, seconds in training steps, images trained))."""
    start_step, start_totals = start
    model, optimizer = t.model, t.optimizer
    epoch = args.start_from_epoch - 1
    t_run, t_train, n_train = time.time(), 0.0, 0
    for epoch in range(args.start_from_epoch, args.n_epochs + 1):
        print0(time.ctime(), "Epoch:", epoch)
        lr = get_lr(epoch, args.init_lr, args.n_epochs, args.warmup_factor)
        set_lr(optimizer, lr)
        if frozen(args, epoch) != (model.backbone_frozen, model.bn_frozen):
            model.set_frozen(*frozen(args, epoch))
            t.train_model = t.wrap()  # DDP (and the compiled step) built again for the new set of trainables
        if len(optimizer.param_groups) > 1 or model.backbone_frozen:
            print0(f"epoch {epoch}: " + ", ".join(
                f"{g.get('name', 'all')} " + ("frozen" if g.get("name") == "backbone" and model.backbone_frozen
                                              else f"lr {g['lr']:.3g}") for g in optimizer.param_groups))
        skip = start_step if epoch == args.start_from_epoch else 0
        data.sampler.set_epoch(epoch, start=skip * args.batch_size)  # a mid-epoch resume skips the steps done
        bad, t0 = [], time.time()

        def save_step(done, totals, epoch=epoch):
            if not args.checkpoint_every_steps or done % args.checkpoint_every_steps:
                return
            totals = totals.clone()
            if dist.is_initialized():
                dist.all_reduce(totals)  # every rank is at this step; rank 0 keeps the sums
            if is_main():
                save_checkpoint({**checkpoint_of(t, epoch - 1, log), "step": done, "totals": totals.cpu()},
                                f"{t.stem}_step.pth")

        train_loss, n_nonfinite = train_one_epoch(args, t, data.train_loader, bad, skip,
                                                  start_totals if skip else None, save_step)
        t_train += time.time() - t0
        n_train += len(data.train_loader) * args.batch_size * run.world_size
        check_finite(model, epoch, n_nonfinite, len(data.train_loader), t.scaler.is_enabled())
        report_bad_images(args, epoch, bad, len(data.train_loader) * args.batch_size, run.world_size)
        val_loss, acc_m, gap_m = (validate(model, data.valid_loader, data.valid_idx, t.criterion, t.autocast,
                                           run.device, run.world_size)
                                  if args.valid_stride else (float("nan"),) * 3)
        if is_main():
            content = (time.ctime() + " " + f"Fold {args.fold}, Epoch {epoch}, lr: {lr:.7f}, "
                       f"train loss: {train_loss:.5f}, valid loss: {val_loss:.5f}, "
                       f"acc_m: {acc_m:.6f}, gap_m: {gap_m:.6f}.")
            print(content, flush=True)
            with open(log.file, "a") as f:
                f.write(content + "\n")
            ckpt = checkpoint_of(t, epoch, log)
            save_checkpoint(ckpt, f"{t.stem}.pth")
            if os.path.exists(f"{t.stem}_step.pth"):
                os.remove(f"{t.stem}_step.pth")  # the epoch is complete: its mid-epoch checkpoint is stale
            if epoch in args.save_epochs:
                save_checkpoint(ckpt, f"{t.stem}_ep{epoch}.pth")
        if epoch == args.stop_at_epoch:
            print0(time.ctime(), "Training Finished!")
            break
    return epoch, (t_run, t_train, n_train)


def finish(args, t, epoch, log, timing):
    """The final checkpoint and the summary; every rank waits until the checkpoint exists."""
    t_run, t_train, n_train = timing
    if is_main():
        save_checkpoint(checkpoint_of(t, epoch, log), f"{t.stem}_final.pth")
        print_summary(log.file, f"{t.stem}_final.pth", n_train, t_train, time.time() - t_run)
    if dist.is_initialized():
        dist.barrier()  # the final checkpoint exists before any rank exits


if __name__ == "__main__":
    run_main(main)
