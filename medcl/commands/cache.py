"""`medcl cache`: show or free the scan cache."""
from .common import HelpFormatter


def add_parser(sub, parent):
    p = sub.add_parser("cache", help="show or free the scan cache (decoded scans shared by every command)",
                       formatter_class=HelpFormatter, parents=[parent],
                       description="Every command reads decoded scans from one cache, keyed by each file's path, size "
                                   "and modification time and by the preprocessing (dims, size, channels, intensity): "
                                   "a second command on the same folder starts without decoding it again; a changed "
                                   "file is decoded again. `info` lists what it holds, `clear` deletes it.",
                       epilog="examples:\n  medcl cache info\n  medcl cache clear --cache-dir /scratch/medcl_cache")
    p.add_argument("action", choices=("info", "clear"))


def run(a, progress, started):
    import os

    from ..data import store

    root = store.default_root()
    if root is None:
        print(f"the scan cache is off ({store.ENV}={os.environ.get(store.ENV)})")
        return
    if a.action == "clear":
        freed = store.clear(root)
        print(f"cleared the scan cache {root}: {freed / 2**20:.1f} MiB freed")
        return
    parts = store.describe(root)
    print(f"scan cache: {root}" + ("" if parts else " (empty)"))
    for d in parts:
        st = d["settings"]
        what = (f"{st.get('dims', '?')}D, {st.get('size', '?')} px, {st.get('channels', '?')} channel(s), "
                f"intensity {st.get('intensity', '?')}")
        print(f"  {what}: {d['scans']} scans, {d['unusable']} unusable, {d['bytes'] / 2**20:.1f} MiB"
              + (f", {d['partial']} partial writes (from killed runs; ignored)" if d["partial"] else "")
              + f"  [{d['folder']}]")
