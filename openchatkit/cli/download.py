"""Flags and body of the dataset download scripts (`data/OIG/prepare.py`, `data/OIG-chip2/...`,
`data/OIG-moderation/...`): each script names its hub repo, default files and destination.

Only argparse is imported at module level, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def download_parser(
    doc: str, repo_id: str, default_dest: Path, default_files: str
) -> argparse.ArgumentParser:
    """The argument parser shared by the dataset download scripts."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--files",
        default=default_files,
        metavar="GLOB",
        help=f"which files of {repo_id} to fetch, matched against file names (default: %(default)s)",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=default_dest,
        help="folder for the decompressed .jsonl files (default: %(default)s)",
    )
    parser.add_argument(
        "--repo", default=repo_id, help="hub dataset id to download from (default: %(default)s)"
    )
    parser.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit (default: the commit recorded in DEST by an earlier run, else "
        "main's, which is then recorded)",
    )
    parser.add_argument(
        "--keep-gz",
        action="store_true",
        help="keep the downloaded .gz files under DEST/.download (default: delete them)",
    )
    return parser


def use_network_timeouts(connect_s: float = 10.0, read_s: float = 60.0) -> None:
    """Give the hub's shared HTTP client timeouts (it has none): a connection that goes silent
    during a long download then fails after `read_s` seconds instead of hanging; the rerun
    resumes it. This changes huggingface_hub's process-wide client, so only scripts call it."""
    import httpx2
    from huggingface_hub import get_session

    get_session().timeout = httpx2.Timeout(read_s, connect=connect_s)


def run_download(args: argparse.Namespace) -> int:
    """Body of the download scripts: download, decompress, print the final files."""
    from openchatkit.data.download import download_dataset
    from openchatkit.errors import UserError
    from openchatkit.fileio import check_writable_dir

    if not args.files.strip():
        raise UserError("--files is empty: give a glob of file names, e.g. 'unified_*'")
    check_writable_dir(args.dest, "--dest")  # before the download
    use_network_timeouts()
    paths = download_dataset(
        args.repo, args.dest, args.files, revision=args.revision, keep_compressed=args.keep_gz
    )
    for path in paths:
        print(path)
    return 0
