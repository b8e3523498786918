"""The eval set held out from the search sets: two calibration sets may share no image (by content), checked on
their sources when the workflow loads (workflow.checks.check_calib_sets) and on their Parquets by the eval
(eval.run.run_eval), which covers the sets on demo data."""
import logging

from vlmquant.errors import VlmquantError


def check_disjoint(eval_name, eval_images, search_name, search_images, allow=False):
    """Refuse an eval set that shares images (by content: {sha256: file}) with a search set, naming both
    sets and one shared image; `allow` (eval.allow_overlap) turns the error into a warning."""
    shared = sorted(set(eval_images) & set(search_images))
    if not shared:
        return
    first = shared[0]
    message = (f"config: eval.calib: {eval_name!r} shares {len(shared)} of its {len(set(eval_images))} images with "
               f"search set {search_name!r} (same content: {eval_images[first]} and {search_images[first]}); "
               "evaluate on held-out images, or set eval.allow_overlap: true")
    if not allow:
        raise VlmquantError(message)
    logging.getLogger(__name__).warning("%s (allowed by eval.allow_overlap)", message)


def check_eval_parquets(eval_calib, eval_path, calib, calib_path, allow=False):
    """check_disjoint on two calibration Parquets (their image_sha256 and file_names columns).
    Raises VlmquantError naming both sets and one shared image (a warning with `allow`)."""
    import pyarrow.parquet as pq  # here: the workflow imports this module when it loads

    def hashes(path):
        t = pq.read_table(path, columns=["image_sha256", "file_names"]).to_pylist()
        return {h: f for row in t for h, f in zip(row["image_sha256"], row["file_names"])}

    if eval_calib != calib:
        check_disjoint(eval_calib, hashes(eval_path), calib, hashes(calib_path), allow)
