"""What the workflow tells the user about the config when it loads: a config error as one line at its file
and YAML line, "did you mean" for a misspelled key or choice (the schema's errors made one line here), and one
note per setting that changes what is written without being asked for (a run that gets no packed checkpoint)."""
import contextlib
import difflib
import os
import re
import sys
from pathlib import Path

import yaml

from vlmquant.errors import VlmquantError

KEY_ERROR = re.compile(r"config: (.+?): (.*)")  # check_config's messages: "config: <dotted key>: <what>"


def did_you_mean(word, choices):
    """' (did you mean X?)' for the choice closest to `word` (difflib), or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def schema_error(config, schema):
    """The one-line message of the most useful of the schema's errors in `config`, or None: an unknown key first
    (with the closest known key: a misspelled required key is also reported missing), then jsonschema's best
    match."""
    import jsonschema

    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(config))
    unknown = [e for e in errors if e.validator == "additionalProperties" and isinstance(e.instance, dict)]
    error = unknown[0] if unknown else jsonschema.exceptions.best_match(errors)
    if error is None:
        return None
    where = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = next(k for k in error.instance if k not in known)
        return f"config: {'.'.join([*where, str(extra)])}: unknown key{did_you_mean(extra, known)}"
    if "propertyNames" in error.absolute_schema_path:
        return (f"config: {'.'.join([*where, str(error.instance)])}: names become folder names: use letters, digits "
                "and - _ . only, starting with a letter or digit")
    return f"config: {'.'.join(where) or '(top level)'}: {error.message}"


def _pairs(node):
    """[(key, (line, pairs of the value))] of a composed YAML mapping node (1-based lines) or of a dict (line
    None); None for anything else."""
    if isinstance(node, yaml.MappingNode):
        return [(k.value, (k.start_mark.line + 1, _pairs(v))) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
    if isinstance(node, dict):
        return [(str(k), (None, _pairs(v))) for k, v in node.items()]
    return None


def _find(pairs, dotted):
    """(whole key found, levels found, line of the deepest level found) of a dotted key path in `pairs`. Names
    may hold dots (a run `w4.5`): at each level, the longest key that starts the rest of the path."""
    depth, line, rest = 0, None, dotted
    while rest and pairs:
        match = [(k, v) for k, v in pairs if rest == k or rest.startswith(f"{k}.")]
        if not match:
            break
        key, (line, pairs) = max(match, key=lambda kv: len(kv[0]))
        depth, rest = depth + 1, rest[len(key) + 1:]
    return not rest, depth, line


def key_line(path, dotted):
    """_find in the YAML file `path`: (whole key found, levels found, 1-based line of the deepest); (False, 0,
    None) for a missing or unreadable file."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False, 0, None
    return _find(_pairs(root), dotted)


def locate(message, files, overrides=None):
    """A check_config message ('config: <key>: <what>') with 'config' replaced by where the key is set: the
    file (and 'line N') that sets it, `files` in rising precedence (config.yaml, then each --configfile),
    or '--config' when the command line sets it. Other messages come back unchanged."""
    m = KEY_ERROR.fullmatch(message)
    if not m or not files:
        return message
    key, what = m.groups()
    if overrides and _find(_pairs(overrides), key)[0]:
        return f"--config: {key}: {what}"
    # the highest-precedence file holding the whole key, else the one holding most of its levels
    found = [(key_line(f, key), i, f) for i, f in enumerate(files) if Path(f).is_file()]
    if not found:
        return message
    (_, _, line), _, file = max(found, key=lambda r: (*r[0][:2], r[1]))
    shown = os.path.relpath(file) if Path(file).resolve().is_relative_to(Path.cwd()) else file
    return f"{shown}: line {line}: {key}: {what}" if line else f"{shown}: {key}: {what}"


@contextlib.contextmanager
def config_errors(files, overrides=None):
    """Inside the block, a VlmquantError ends the process with its one line (located) on stderr and exit
    status 1, instead of Snakemake's header and internal frames."""
    try:
        yield
    except VlmquantError as e:
        print(locate(str(e), files, overrides), file=sys.stderr)
        sys.exit(1)


def notes(config):
    """One line per target run whose written files differ from what the run's settings alone suggest:
    no packed checkpoint because its scheme has no compressed-tensors form (formats unset)."""
    from vlmquant.spec import RunSpec

    out = []
    for name in config["targets"].get("runs", []):
        run = config["runs"][name]
        reason = RunSpec.from_config(name, run).packed_form()
        if reason and "formats" not in run:
            why = reason.split(": ", 1)[-1]  # without the scheme's fields
            out.append(f"note: runs.{name}: writes checkpoint/ (pseudo) only, no packed/: {why} "
                       "(set formats: [pseudo] to drop this note)")
    return out


def print_notes(config):
    """The notes on stderr, one line each (the workflow prints them once, in the main process)."""
    for line in notes(config):
        print(line, file=sys.stderr)
