"""Input pipeline: image reading and the official DETR transforms."""
