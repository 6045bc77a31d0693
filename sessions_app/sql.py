"""Plain SQL named from the models, for the statements a turn runs every
time (the lease, the limits, the mapping, the record, the transcript's
summary): there, building an ORM query costs more CPU than running it.
Names come from the models' metadata, values go through the fields' own
adaptation, so the SQL stays what the ORM would send."""

from __future__ import annotations


def names(model, connection) -> tuple[str, dict[str, str]]:
    """``model``'s table and its columns (by field name), quoted for ``connection``."""
    quote = connection.ops.quote_name
    return quote(model._meta.db_table), {f.name: quote(f.column) for f in model._meta.concrete_fields}


def db_value(model, name: str, value, connection):
    """``value`` as the database takes it for ``model``'s field ``name``."""
    return model._meta.get_field(name).get_db_prep_save(value, connection)
