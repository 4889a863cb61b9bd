"""What a loaded dataset is: metadata, preprocessing and a random-access source per split, never the examples.

Everything outside research/data (training, reporting, evaluation, export) works on this metadata; the examples
are read through the sources by the input pipelines only, so no dataset has to fit in memory.
"""

import dataclasses

from research.data import preprocess


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    image_shape: tuple  # The model's input [H, W, C].
    class_names: list
    train: object  # A research.data.sources source, or None where only evaluation reads the dataset.
    eval: object
    preprocessing: preprocess.Preprocessing
    stored_shape: tuple  # The images as stored: [H, W, C], None where sizes vary.
    reading: str = "in memory"  # How the examples are read, for the log line that names the source.
    file_lists: dict = None  # What research.train records in data_files.json when a run starts (folder datasets).

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def num_train(self):
        return len(self.train)

    def transform(self, config):
        return preprocess.Transform(config, self.preprocessing, self.stored_shape)

    def metadata(self):
        """What dataset.json records: enough for predict, export and evaluate to rebuild the inputs."""
        return {"name": self.name, "image_shape": list(self.image_shape), "class_names": list(self.class_names),
                "preprocessing": self.preprocessing.to_json()}
