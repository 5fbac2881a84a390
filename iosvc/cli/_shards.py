"""``iosvc shards pack|info|verify|buffers``: training datasets as compressed shards
(``dataloaders``), and the reusable memory their readers keep on a node.

Paths without a scheme are local; ``iosvc://…`` (or any fsspec URL) names the cluster.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from iosvc.cli._common import ClusterOpt, console
from iosvc.policies import format_size, parse_size

shards_app = typer.Typer(
    help="Pack datasets into compressed shards for training (see `dataloaders`).",
    no_args_is_help=True,
)


def _options(cluster_file: Path | None, *urls: str) -> dict[str, str] | None:
    """fsspec storage options naming the cluster file, for ``iosvc://`` URLs."""
    if cluster_file is not None and any(u.startswith("iosvc://") for u in urls):
        return {"cluster": str(cluster_file)}
    return None


@shards_app.command("pack")
def pack(
    src: Annotated[str, typer.Argument(help="Directory of sample files (e.g. an ImageFolder).")],
    dst: Annotated[str, typer.Argument(help="Where to write shards: iosvc://… or a path.")],
    shard_size: Annotated[
        str, typer.Option("--shard-size", help="Uncompressed bytes per shard, e.g. 64MiB.")
    ] = "64MiB",
    format: Annotated[
        str, typer.Option("--format", help="raw (files as they are), records or auto.")
    ] = "raw",
    codec: Annotated[
        str | None,
        typer.Option(help="Codec of the file bytes with --format records, e.g. zstd:3."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already at DST.")] = False,
    cluster_file: ClusterOpt = None,
) -> None:
    """Pack every file under SRC into shards at DST and report the compression ratio."""
    from dataloaders import pack_directory

    if codec is not None and format == "raw":
        raise typer.BadParameter("--codec needs --format records (raw stores files as they are)")
    summary = pack_directory(
        src,
        dst,
        format=format,
        shard_bytes=parse_size(shard_size),
        codecs={"data": codec} if codec else None,
        overwrite=overwrite,
        storage_options=_options(cluster_file, src, dst),
    )
    classes = summary.manifest.attrs.get("classes")
    console.print(
        f"packed {summary.samples:,} files"
        + (f" in {len(classes)} classes" if classes else "")
        + f" into {summary.shards} {summary.format} shards at {dst}",
        highlight=False,
    )
    console.print(
        f"{format_size(summary.raw_bytes)} -> {format_size(summary.bytes)} stored: "
        f"compression ratio {summary.ratio:.2f} "
        f"in {summary.seconds:.1f} s",
        highlight=False,
    )


@shards_app.command("info")
def info(
    url: Annotated[str, typer.Argument(help="A dataset: iosvc://… or a path.")],
    cluster_file: ClusterOpt = None,
) -> None:
    """Show a dataset's format, fields, shards and compression ratio."""
    from dataloaders import load_manifest

    manifest = load_manifest(url, _options(cluster_file, url))
    console.print(
        f"{url}: {manifest.samples:,} samples in {len(manifest.shards)} {manifest.format} "
        f"shards; {format_size(manifest.raw_bytes)} -> {format_size(manifest.bytes)} "
        f"(ratio {manifest.ratio:.2f})",
        highlight=False,
    )
    for spec in manifest.fields:
        shape = f" {spec.dtype}{list(spec.shape or ())}" if spec.kind == "array" else ""
        console.print(f"  {spec.name}: {spec.kind}{shape} codec={spec.codec}", highlight=False)


@shards_app.command("verify")
def verify(
    url: Annotated[str, typer.Argument(help="A dataset: iosvc://… or a path.")],
    cluster_file: ClusterOpt = None,
) -> None:
    """Read every shard and check its size and xxh3 checksum against the manifest."""
    from dataloaders import verify_shards

    manifest = verify_shards(url, _options(cluster_file, url))
    console.print(
        f"{url}: {len(manifest.shards)} shards, {manifest.samples:,} samples, all checksums match",
        highlight=False,
    )


@shards_app.command("buffers")
def buffers(
    directory: Annotated[
        str | None,
        typer.Option(
            "--dir",
            help="The readers' buffer directory (default: $DATALOADERS_BUFFER_DIR, else "
            "/dev/shm/dataloaders-<uid>).",
        ),
    ] = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="Delete the files no reader holds now.")
    ] = False,
    each: Annotated[
        bool, typer.Option("--files", help="List every file, not a line per kind.")
    ] = False,
) -> None:
    """Show (or --clear) the memory data loaders keep in tmpfs on this node: shard
    buffers (slot-N) and batch arenas (batch-N), reused from one epoch and run to the next,
    and the node cache (cache-KEY: remote shard files kept for the next readers)."""
    from dataloaders._huge import huge_bytes, tmpfs_huge_pages
    from dataloaders._slots import KINDS, SlotDirectory, default_slot_dir

    path = directory or default_slot_dir()
    if path is None:
        console.print("no buffer directory here (no writable /dev/shm and none given)")
        raise typer.Exit(1)
    slots = SlotDirectory(path)
    if clear:
        freed = slots.clear()
        kept = slots.files()
        console.print(
            f"{path}: freed {format_size(freed)}; {len(kept)} files in use kept "
            f"({format_size(sum(f.bytes for f in kept))})",
            highlight=False,
            soft_wrap=True,
        )
        return
    files = slots.files()
    used = sum(f.bytes for f in files)
    budget = f" of {format_size(slots.budget)} allowed" if os.path.isdir(path) else ""
    console.print(
        f"{path}: {len(files)} files, {format_size(used)}{budget}", highlight=False, soft_wrap=True
    )
    huge = tmpfs_huge_pages(path)
    if huge in ("always", "within_size"):
        console.print(f"  in huge pages (tmpfs huge={huge})", highlight=False)
    elif huge is not None:  # never, deny, or advise (slots are reserved with fallocate)
        collapsed = huge_bytes(os.path.join(path, f.name) for f in files)
        if collapsed:
            console.print(
                f"  {format_size(collapsed)} of {format_size(used)} in 2 MiB pages: collapsed "
                f"by the readers, as the tmpfs has huge={huge} (Linux >= 6.1)",
                highlight=False,
                soft_wrap=True,
            )
        else:
            console.print(
                f"  in 4 KiB pages (a tmpfs with huge={huge}; readers collapse new files into "
                "2 MiB pages where the kernel can, Linux >= 6.1): mapping them costs 4-6x "
                "what 2 MiB pages do; where they stay so, ask your admins for a tmpfs mounted "
                "with huge=within_size and set $DATALOADERS_BUFFER_DIR to a directory in it",
                highlight=False,
                soft_wrap=True,
            )
    now = time.time()
    if each:
        for f in files:
            kind = next((k for p, k in KINDS.items() if f.name.startswith(p)), "")
            state = "in use" if f.in_use else f"free, used {now - f.last_used:.0f} s ago"
            console.print(
                f"  {f.name:12} {kind:12} {format_size(f.bytes):>10}  {state}", highlight=False
            )
        return
    for prefix, kind in KINDS.items():  # a node cache may hold thousands of files
        group = [f for f in files if f.name.startswith(prefix)]
        if group:
            in_use = sum(f.in_use for f in group)
            last = now - max(f.last_used for f in group)
            console.print(
                f"  {kind:12} {len(group):>6} files {format_size(sum(f.bytes for f in group)):>10}"
                f"  {in_use} in use, last used {last:.0f} s ago",
                highlight=False,
            )
