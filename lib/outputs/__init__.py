"""Outputs that are never half-written or misreported: path checks before the run (paths), atomic writers
(atomic), claims against concurrent runs (claims), SIGTERM as an interrupt (signals), versions for the results
(provenance) and a JSON value cache (cache). Everything is importable from here."""
from .atomic import (append_jsonl, make_parents, publish_directory, remove_empty, save_model_atomic,
                     write_json_atomic)
from .cache import cached_json_entry
from .claims import claimed_outputs
from .paths import (check_free_space, check_output_paths, check_path_length, check_writable_file, resolved,
                    write_error)
from .provenance import versions
from .signals import termination_as_interrupt

__all__ = ["append_jsonl", "cached_json_entry", "check_free_space", "check_output_paths", "check_path_length",
           "check_writable_file", "claimed_outputs", "make_parents", "publish_directory", "remove_empty",
           "resolved", "save_model_atomic", "termination_as_interrupt", "versions", "write_error",
           "write_json_atomic"]
