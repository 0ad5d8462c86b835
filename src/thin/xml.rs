//! thin_dump / thin_restore XML.
