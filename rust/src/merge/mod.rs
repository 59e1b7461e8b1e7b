//! Adapter merging and export.
