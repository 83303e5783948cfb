"""FastSurferCNN label tables: 79 network classes and the 51 hemisphere-merged sagittal classes.

Class index ``k`` of the axial/coronal networks predicts FreeSurfer label ``LABEL_IDS[k]``
(the aparc.DKTatlas+aseg ids of FastSurfer's ``FastSurfer_ColorLUT.tsv``). The sagittal network
cannot tell left from right, so it predicts 51 classes in which every lateralised structure is
merged into one class, named by its ``Right-*`` aseg id or its ``ctx-lh-*`` cortical id.
"""

from typing import NamedTuple

import numpy as np


class Label(NamedTuple):
    """One network class: its index, FreeSurfer label id and FreeSurfer name."""

    index: int
    label_id: int
    name: str


_LUT: tuple[tuple[int, str], ...] = (
    (0, "Background"),
    (2, "Left-Cerebral-White-Matter"),
    (4, "Left-Lateral-Ventricle"),
    (5, "Left-Inf-Lat-Vent"),
    (7, "Left-Cerebellum-White-Matter"),
    (8, "Left-Cerebellum-Cortex"),
    (10, "Left-Thalamus"),
    (11, "Left-Caudate"),
    (12, "Left-Putamen"),
    (13, "Left-Pallidum"),
    (14, "3rd-Ventricle"),
    (15, "4th-Ventricle"),
    (16, "Brain-Stem"),
    (17, "Left-Hippocampus"),
    (18, "Left-Amygdala"),
    (24, "CSF"),
    (26, "Left-Accumbens-area"),
    (28, "Left-VentralDC"),
    (31, "Left-choroid-plexus"),
    (41, "Right-Cerebral-White-Matter"),
    (43, "Right-Lateral-Ventricle"),
    (44, "Right-Inf-Lat-Vent"),
    (46, "Right-Cerebellum-White-Matter"),
    (47, "Right-Cerebellum-Cortex"),
    (49, "Right-Thalamus"),
    (50, "Right-Caudate"),
    (51, "Right-Putamen"),
    (52, "Right-Pallidum"),
    (53, "Right-Hippocampus"),
    (54, "Right-Amygdala"),
    (58, "Right-Accumbens-area"),
    (60, "Right-VentralDC"),
    (63, "Right-choroid-plexus"),
    (77, "WM-hypointensities"),
    (1002, "ctx-lh-caudalanteriorcingulate"),
    (1003, "ctx-lh-caudalmiddlefrontal"),
    (1005, "ctx-lh-cuneus"),
    (1006, "ctx-lh-entorhinal"),
    (1007, "ctx-lh-fusiform"),
    (1008, "ctx-lh-inferiorparietal"),
    (1009, "ctx-lh-inferiortemporal"),
    (1010, "ctx-lh-isthmuscingulate"),
    (1011, "ctx-lh-lateraloccipital"),
    (1012, "ctx-lh-lateralorbitofrontal"),
    (1013, "ctx-lh-lingual"),
    (1014, "ctx-lh-medialorbitofrontal"),
    (1015, "ctx-lh-middletemporal"),
    (1016, "ctx-lh-parahippocampal"),
    (1017, "ctx-lh-paracentral"),
    (1018, "ctx-lh-parsopercularis"),
    (1019, "ctx-lh-parsorbitalis"),
    (1020, "ctx-lh-parstriangularis"),
    (1021, "ctx-lh-pericalcarine"),
    (1022, "ctx-lh-postcentral"),
    (1023, "ctx-lh-posteriorcingulate"),
    (1024, "ctx-lh-precentral"),
    (1025, "ctx-lh-precuneus"),
    (1026, "ctx-lh-rostralanteriorcingulate"),
    (1027, "ctx-lh-rostralmiddlefrontal"),
    (1028, "ctx-lh-superiorfrontal"),
    (1029, "ctx-lh-superiorparietal"),
    (1030, "ctx-lh-superiortemporal"),
    (1031, "ctx-lh-supramarginal"),
    (1034, "ctx-lh-transversetemporal"),
    (1035, "ctx-lh-insula"),
    (2002, "ctx-rh-caudalanteriorcingulate"),
    (2005, "ctx-rh-cuneus"),
    (2010, "ctx-rh-isthmuscingulate"),
    (2012, "ctx-rh-lateralorbitofrontal"),
    (2013, "ctx-rh-lingual"),
    (2014, "ctx-rh-medialorbitofrontal"),
    (2016, "ctx-rh-parahippocampal"),
    (2017, "ctx-rh-paracentral"),
    (2021, "ctx-rh-pericalcarine"),
    (2022, "ctx-rh-postcentral"),
    (2023, "ctx-rh-posteriorcingulate"),
    (2024, "ctx-rh-precentral"),
    (2025, "ctx-rh-precuneus"),
    (2028, "ctx-rh-superiorfrontal"),
)

#: The 79 network classes, in class-index order.
LABELS: tuple[Label, ...] = tuple(Label(i, lid, name) for i, (lid, name) in enumerate(_LUT))
#: FreeSurfer label id of each network class, shape (79,).
LABEL_IDS: np.ndarray = np.array([lab.label_id for lab in LABELS], dtype=np.int32)
NUM_CLASSES: int = len(LABELS)

_NAME_TO_ID = {name: lid for lid, name in _LUT}
_ID_TO_CLASS = {lab.label_id: lab.index for lab in LABELS}


def _merged_name(name: str) -> str:
    """Hemisphere-merged name: ``Left-X`` -> ``Right-X``, ``ctx-rh-X`` -> ``ctx-lh-X``."""
    for side, merged in (("Left-", "Right-"), ("ctx-rh-", "ctx-lh-")):
        if name.startswith(side):
            return merged + name.removeprefix(side)
    return name


#: FreeSurfer label id of each sagittal class, shape (51,): all labels except Left-*/ctx-rh-*.
SAGITTAL_LABEL_IDS: np.ndarray = np.array(
    [lid for lid, name in _LUT if _merged_name(name) == name], dtype=np.int32
)
NUM_SAGITTAL_CLASSES: int = len(SAGITTAL_LABEL_IDS)

_SAG_ID_TO_CLASS = {int(lid): k for k, lid in enumerate(SAGITTAL_LABEL_IDS)}

#: Sagittal class feeding each of the 79 classes, shape (79,): both hemispheres of a lateralised
#: structure read the same merged sagittal class (FastSurfer's ``map_prediction_sagittal2full``).
FULL_TO_SAGITTAL: np.ndarray = np.array(
    [_SAG_ID_TO_CLASS[_NAME_TO_ID[_merged_name(lab.name)]] for lab in LABELS], dtype=np.intp
)


def label_id(index: int) -> int:
    """FreeSurfer label id of network class ``index`` (0..78)."""
    return LABELS[index].label_id


def label_name(index: int) -> str:
    """FreeSurfer name of network class ``index`` (0..78)."""
    return LABELS[index].name


def class_index(freesurfer_id: int) -> int:
    """Network class (0..78) predicting FreeSurfer label ``freesurfer_id``; KeyError if none."""
    return _ID_TO_CLASS[freesurfer_id]


def sagittal_label_id(index: int) -> int:
    """FreeSurfer label id naming sagittal class ``index`` (0..50)."""
    return int(SAGITTAL_LABEL_IDS[index])
