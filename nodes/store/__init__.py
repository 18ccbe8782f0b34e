"""The model store: models on disk, downloads, weights served to peers, sha256 manifests."""
