"""The names in every dataset's folder layout: splits, the folder of each dataset under
`$DATASET`, and the folders the preparation scripts create.

`segm.data.layout` describes the layouts with these names and the preparation scripts
(`segm.scripts.prepare_*`) build the folders they name. Plain constants, no import: the
scripts start (and answer `-h`) without torch or mmseg.
"""

SPLITS = ("train", "val", "test")
# The splits of each dataset: Pascal-Context, synthetic and custom have no test split.
DATASET_SPLITS = {
    "ade20k": SPLITS,
    "pascal_context": ("train", "val"),
    "cityscapes": SPLITS,
    "synthetic": ("train", "val"),
    "custom": ("train", "val"),
}
# ADE20K-style layouts (ade20k, synthetic, custom): <IMAGE_DIR>/<folder>/, <LABEL_DIR>/<folder>/.
FOLDER_SPLITS = {"train": "training", "val": "validation"}
IMAGE_DIR = "images"
LABEL_DIR = "annotations"
# Each dataset's folder under $DATASET (custom has none: it is always given).
ROOT_DIRS = {
    "ade20k": "ade20k",
    "pascal_context": "pcontext",
    "cityscapes": "cityscapes",
    "synthetic": "synthetic",
}

ADE20K_DIR = "ADEChallengeData2016"  # images/ and annotations/, each with training/ and validation/
ADE20K_TEST_DIR = "release_test/testing"
VOC_DIR = "VOCdevkit/VOC2010"  # Pascal-Context's images, labels and split files
PCONTEXT_IMAGE_DIR = "JPEGImages"
PCONTEXT_LABEL_DIR = "SegmentationClassContext"
PCONTEXT_SPLIT_DIR = "ImageSets/SegmentationContext"  # <split>.txt
CITYSCAPES_IMAGE_DIR = "leftImg8bit"  # <split>/<city>/<name>_leftImg8bit.png
CITYSCAPES_LABEL_DIR = "gtFine"  # <split>/<city>/<name>_gtFine_labelTrainIds.png
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
