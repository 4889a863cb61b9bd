"""What a loaded dataset is: metadata, preprocessing and a random-access source per split, never the examples; and
the metadata alone, which is all a run directory keeps of it (dataset.json).

Everything outside research/data (training, reporting, evaluation, export) works on this metadata; the examples
are read through the sources by the input pipelines only, so no dataset has to fit in memory.
"""

import dataclasses

from research.data import preprocess


@dataclasses.dataclass(frozen=True)
class Metadata:
    """What a model builder, predict, export and evaluate need to know of a dataset, and what dataset.json records:
    the model's input shape, the class names, and how a stored image becomes a model input."""
    name: str
    image_shape: tuple  # The model's input [H, W, C].
    class_names: list
    preprocessing: preprocess.Preprocessing = None

    @property
    def num_classes(self):
        return len(self.class_names)

    def to_json(self):
        return {"name": self.name, "image_shape": list(self.image_shape), "class_names": list(self.class_names),
                "preprocessing": self.preprocessing.to_json()}

    @classmethod
    def from_json(cls, record):
        """Raises ValueError, KeyError or TypeError for a damaged record. Runs written before preprocessing was
        recorded resized whole images, unnormalized."""
        shape = tuple(record["image_shape"])
        prep = preprocess.Preprocessing.from_json(record["preprocessing"]) if "preprocessing" in record else \
            preprocess.Preprocessing(shape[:2], shape[2])
        return cls(record["name"], shape, list(record["class_names"]), prep)


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
    extra_eval: tuple = ()  # (split, source) of each --extra_eval split (research/evaluation.py).

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
        return Metadata(self.name, self.image_shape, self.class_names, self.preprocessing)
