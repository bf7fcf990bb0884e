"""JSON schemas shipped inside the package (and so inside every packaged bundle).

The Model Zoo's metadata schema is a URL that cannot be fetched offline, and ``verify_metadata`` always
downloads its ``--filepath`` unless the file exists, so the field list is kept here as a local schema.
"""

from pathlib import Path

METADATA_SCHEMA = Path(__file__).with_name("meta_schema.json")
