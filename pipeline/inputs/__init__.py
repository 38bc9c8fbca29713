"""What a run reads: the walk of folders and buckets, manifests and groups, objects and URLs
fetched, images made ready to send, reference images, and the checks made before a run starts."""
