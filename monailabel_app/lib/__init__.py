"""The KeyMorph MONAI Label app's library: registration through the bundle, infer tasks, train task."""
