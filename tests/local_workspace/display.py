"""display(), displayHTML() and figures in an execution context: tables and images as results.

``display`` shows a table (pandas or Spark DataFrame, a list of dicts or rows: at most
``MAX_TABLE_ROWS`` rows or ``MAX_TABLE_BYTES``, then ``truncated``) or an image (a matplotlib
Figure, PNG bytes: inline as a data URL up to ``image_inline_limit``, else a file in the plots
dir). The last display of a command is its result. ``plt.show()`` displays the open figures;
figures still open when a command ends become images only in ``plots_mode="images"`` (S23).
"""

import json
import os
import sys

from . import sandbox

MAX_TABLE_ROWS = 10_000
MAX_TABLE_BYTES = 2 * 1024 * 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The context's facts (``setup``), the running command's limits and its last display (``begin``).
_STATE = {"init": {}, "limits": {}, "result": None}


def setup(init):
    _STATE["init"] = init


def begin(limits):
    """A command starts: its limits (image_inline_limit, plots_dir, plots_mode), no display."""
    _STATE["limits"] = limits
    _STATE["result"] = None


def shown():
    """The last display() result of the running command, or None."""
    return _STATE["result"]


def _spark_type(value):
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    import datetime

    if isinstance(value, datetime.datetime):
        return "timestamp"
    if isinstance(value, datetime.date):
        return "date"
    return "string"


def _json_cell(value):
    import datetime
    import math

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value, default=str)
        except (TypeError, ValueError):
            return str(value)
    # numpy / pandas scalars
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _json_cell(item())
        except Exception:
            pass
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        try:
            return isoformat()
        except Exception:
            pass
    return str(value)


def _table_result(columns, types, rows):
    data = []
    size = 2
    truncated = False
    for row in rows:
        if len(data) >= MAX_TABLE_ROWS:
            truncated = True
            break
        cells = [_json_cell(v) for v in row]
        row_size = len(json.dumps(cells, default=str)) + 1
        if size + row_size > MAX_TABLE_BYTES:
            truncated = True
            break
        size += row_size
        data.append(cells)
    schema = [
        {"name": str(name), "type": json.dumps(t), "metadata": "{}"}
        for name, t in zip(columns, types)
    ]
    return {
        "resultType": "table",
        "data": data,
        "schema": schema,
        "isJsonSchema": True,
        "truncated": truncated,
    }


def _pandas_type(dtype):
    kind = getattr(dtype, "kind", "O")
    if kind == "b":
        return "boolean"
    if kind in "iu":
        return "long"
    if kind == "f":
        return "double"
    if kind == "M":
        return "timestamp"
    return "string"


def _pandas_table(df):
    columns = [str(c) for c in df.columns]
    types = [_pandas_type(df.dtypes.iloc[i]) for i in range(len(columns))]
    head = df.head(MAX_TABLE_ROWS + 1)
    rows = head.itertuples(index=False, name=None)
    result = _table_result(columns, types, rows)
    if len(df) > MAX_TABLE_ROWS:
        result["truncated"] = True
    return result


_SPARK_TYPE_NAMES = {
    "LongType": "long", "IntegerType": "integer", "ShortType": "short", "ByteType": "byte",
    "DoubleType": "double", "FloatType": "float", "BooleanType": "boolean",
    "TimestampType": "timestamp", "TimestampNTZType": "timestamp_ntz", "DateType": "date",
    "StringType": "string",
}


def spark_table(df):
    fields = df.schema.fields
    columns = [f.name for f in fields]
    types = [_SPARK_TYPE_NAMES.get(type(f.dataType).__name__, "string") for f in fields]
    rows = [tuple(r) for r in df.take(MAX_TABLE_ROWS + 1)]
    return _table_result(columns, types, rows)


def _rows_table(rows, columns=None):
    rows = list(rows)
    if rows and all(isinstance(r, dict) for r in rows):
        names = []
        for r in rows:
            for k in r:
                if k not in names:
                    names.append(k)
        tuples = [tuple(r.get(k) for k in names) for r in rows]
    else:
        tuples = [tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in rows]
        width = max((len(t) for t in tuples), default=len(columns or []))
        names = list(columns) if columns else ["_%d" % (i + 1) for i in range(width)]
        tuples = [t + (None,) * (len(names) - len(t)) for t in tuples]
    types = []
    for i in range(len(names)):
        t = "string"
        for row in tuples:
            if i < len(row) and row[i] is not None:
                t = _spark_type(row[i])
                break
        types.append(t)
    return _table_result(names, types, tuples)


def _image_result(png):
    limits = _STATE["limits"]
    inline_limit = limits.get("image_inline_limit", 512 * 1024)
    if len(png) > inline_limit and limits.get("plots_dir"):
        import uuid

        name = "%s.png" % uuid.uuid4()
        plots_dir = sandbox.local_path(_STATE["init"].get("state_dir"),
                                       _STATE["init"]["cluster_id"], limits["plots_dir"])
        path = os.path.join(plots_dir, name)
        with open(path + ".tmp", "wb") as f:
            f.write(png)
        os.replace(path + ".tmp", path)
        return {"resultType": "images", "fileNames": ["/plots/" + name]}
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {"resultType": "images", "fileNames": [url]}


def _figure_png(fig):
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _is_instance_of(obj, module_prefix, class_name):
    for klass in type(obj).__mro__:
        if klass.__name__ == class_name and (klass.__module__ or "").startswith(module_prefix):
            return True
    return False


def display(obj=None, *args, **kwargs):
    """Show a table (DataFrame, list of dicts/rows) or an image (Figure, PNG bytes)."""
    if _is_instance_of(obj, "pandas", "DataFrame"):
        result = _pandas_table(obj)
    elif _is_instance_of(obj, "pyspark", "DataFrame"):
        result = spark_table(obj)
    elif _is_instance_of(obj, "matplotlib", "Figure"):
        if _STATE["limits"].get("plots_mode") == "repr":
            print(repr(obj))  # only the figure's text form reaches the API (S23)
            return
        result = _image_result(_figure_png(obj))
    elif isinstance(obj, (bytes, bytearray)) and bytes(obj[:8]) == PNG_MAGIC:
        result = _image_result(bytes(obj))
    elif isinstance(obj, (list, tuple)) and (not obj or isinstance(obj[0], (dict, list, tuple))):
        result = _rows_table(obj, kwargs.get("columns") or (args[0] if args else None))
    elif _is_instance_of(obj, "pandas", "Series"):
        result = _pandas_table(obj.to_frame())
    else:
        result = {"resultType": "text", "data": str(obj)}
    _STATE["result"] = result


def displayHTML(html):
    _STATE["result"] = {"resultType": "text", "data": str(html)}


def _show_open_figures(plt, close=True):
    nums = plt.get_fignums()
    for num in nums:
        display(plt.figure(num))
    if close and nums:
        plt.close("all")


def patch_pyplot(plt):
    """``plt.show()`` displays the open figures (a pyplot import hook calls this)."""
    if getattr(plt, "_local_workspace_patched", False):
        return

    def show(*args, **kwargs):
        _show_open_figures(plt)

    plt.show = show
    plt._local_workspace_patched = True


def show_figures_at_end():
    """The command's code ended: in ``plots_mode="images"`` figures still open become images, as
    the inline backend shows them; in ``"repr"`` nothing but their text comes back (S23)."""
    plt = sys.modules.get("matplotlib.pyplot")
    images = _STATE["limits"].get("plots_mode") != "repr"
    if plt is not None and _STATE["result"] is None and images:
        _show_open_figures(plt)


def close_all_figures():
    """As the inline backend does, no figure outlives its command, shown or not."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        try:
            plt.close("all")
        except Exception:
            pass
