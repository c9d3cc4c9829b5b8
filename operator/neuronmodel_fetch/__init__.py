"""Download a compiled model into the rewrite Job's scratch volume: an S3 prefix or an http(s) archive."""
