//! Metadata checker (thin_check).
