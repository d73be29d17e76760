"""SQL commands of an execution context (``language: "sql"``).

The statements (split on ``;`` outside quotes) run on the context's SparkSession; the last one's
result is the command's table result, under the same caps as ``display()``. An error answers with
the Spark exception's name and first line as the ``summary``.
"""

from .cell import RED, RESET, exc_name, summary
from .display import spark_table


def run(code, namespace):
    """A ``language: sql`` command: the statement(s) on this context's SparkSession; the last
    statement's result as a table (same caps as display())."""
    spark = namespace["spark"]
    statements = [s for s in split_statements(code) if s.strip()]
    try:
        df = None
        for statement in statements:
            df = spark.sql(statement)
        if df is None:
            return {"resultType": "text", "data": ""}
        return spark_table(df)
    except Exception as e:  # a cancel (KeyboardInterrupt) ends the command as cancelled
        name = exc_name(e)
        message = str(e).strip().split("\n")[0]
        return {"resultType": "error", "summary": summary(name, message),
                "cause": RED + name + RESET + ": " + str(e)}


def split_statements(code):
    """Statements split on ';' outside quotes."""
    parts, current, quote = [], [], None
    for ch in code:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"', "`"):
            quote = ch
            current.append(ch)
        elif ch == ";":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts
