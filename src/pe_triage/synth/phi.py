"""Realistic protected health information for the synthetic headers, and the list of what was used.

Every string is distinctive (at least 6 characters, letters mixed in wherever the DICOM value
representation allows) so that a de-identification test can search outputs for it without false
alarms; :meth:`PatientPHI.strings` lists each value and each piece of a person name.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

_FAMILY = (
    "KOWALCZYK", "HALVORSEN", "BRENNAGH", "OKONKWO", "VASQUELLA", "THORNBURY", "LINDQVIST", "ABERNATHY",
    "CASTELLANOS", "MWANGIRU", "PRZYBYLSKI", "FAIRWEATHER", "DUBROVSKY", "NAKAMURAYA", "OYELARAN",
    "WESTERHOLM", "QUINTAVALLE", "BLACKMORTON", "HAUGELAND", "MARCHETTI", "SZCZEPANIK", "GALLWEYTH",
    "ROSSENDALE", "FERNHOLLOW", "KAPADIAWALA", "ESTERHAZIO", "WHITTINGALE", "ACHTERBERG", "DELACROUX",
    "MONTGOVERN", "HOLLISTRAN", "ZEMANOVICA", "BALDERRAMO", "STRAUGHTON", "IVERSHOLT", "CORBETTINE",
)
_GIVEN_F = (
    "Margaret", "Beatrix", "Henrietta", "Ingeborg", "Philippa", "Rosalind", "Annelise", "Theodora",
    "Georgina", "Marisol", "Ottilie", "Wilhelmina", "Dorothea", "Esmeralda", "Clementine", "Florencia",
)
_GIVEN_M = (
    "Theodore", "Augustin", "Benedikt", "Cornelius", "Lorenzo", "Ferdinand", "Maximilian", "Leopold",
    "Reginald", "Sebastien", "Thaddeus", "Barnabas", "Evander", "Ignatius", "Percival", "Rutherford",
)
_DOCTOR_FAMILY = (
    "ADEYEMI-STROUD", "VILLANUEVA-ROSS", "HARGREAVESON", "CHAUDHARI-BELL", "OSTERMANNSON", "FITZWILLIAMS",
    "ELLSWORTHY", "BOGDANOVICZ", "TREMBLAYNE", "NWACHUKWUDI", "SORENSGAARD", "PEMBERTHY",
)
_DOCTOR_GIVEN = ("Adaeze", "Henrik", "Priyanka", "Cosimo", "Solveig", "Tobias", "Yolanda", "Lucian", "Marguerite")
_STREETS = ("Wexcombe Lane", "Harrowgate Road", "Quayside Parade", "Cedarholt Road", "Linnet Crescent",
            "Saltmarsh Row", "Ambleforth Street", "Greywether Close")
_TOWNS = ("Marlbury", "Vellmoor", "Kestrel Bay", "Ashby Fenwick", "Oldcastle Reach", "Tamsworth")
_INSTITUTIONS = (
    ("Saint Aldhelm Royal Infirmary", "14 Wexcombe Lane, Marlbury MB3 9QT", "SARI-CT02", "Radiology West Wing"),
    ("Vellmoor County Hospital", "220 Harrowgate Road, Vellmoor VR7 2LP", "VCH-CTSCAN1", "Imaging Directorate"),
    ("Kestrel Bay Medical Centre", "5 Quayside Parade, Kestrel Bay KB1 4ZX", "KBMC_CT_A", "Department of Radiology"),
    ("Ashby Fenwick University Hospital", "1 Greywether Close, Ashby Fenwick AF2 8RN", "AFUH-RAD-CT7",
     "Cardiothoracic Imaging"),
)
_HISTORY = (
    "Sudden dyspnoea after long-haul flight, Wells score {wells}",
    "Pleuritic chest pain, tachycardic {hr} bpm, recent knee surgery",
    "Haemoptysis and calf swelling, D-dimer {dd} ng/mL",
    "Syncope at home, SpO2 {spo2}% on air, on oral contraceptive",
    "Known malignancy, new breathlessness, D-dimer {dd} ng/mL",
)


@dataclass(frozen=True)
class SitePHI:
    institution: str
    address: str
    station: str
    department: str

    def strings(self) -> list[str]:
        return [self.institution, self.address, self.station, self.department]


def site_phi(index: int) -> SitePHI:
    """The hospital's identity: by site index, so a site keeps its name across seeds."""
    name, address, station, department = _INSTITUTIONS[index % len(_INSTITUTIONS)]
    if index >= len(_INSTITUTIONS):
        name = f"{name} Campus {index // len(_INSTITUTIONS) + 1}"
    return SitePHI(name, address, station, department)


@dataclass(frozen=True)
class PatientPHI:
    family: str
    given: str
    mrn: str
    other_id: str
    birth_date: str  # YYYYMMDD
    sex: str
    age: str  # DICOM AS, e.g. 067Y
    address: str
    study_date: str
    study_time: str
    series_time: str
    acquisition_time: str
    accession: str
    study_id: str
    referring: tuple[str, str]  # (family, given)
    performing: tuple[str, str]
    operator: tuple[str, str]
    study_description: str
    image_comments: str
    history: str
    private_value: str

    @property
    def name(self) -> str:
        return f"{self.family}^{self.given}"

    @staticmethod
    def person(pn: tuple[str, str], prefix: str = "") -> str:
        return f"{pn[0]}^{pn[1]}" + (f"^^{prefix}" if prefix else "")

    def strings(self) -> list[str]:
        """Every injected value, plus the pieces of every person name."""
        out = [self.name, self.family, self.given, self.mrn, self.other_id, self.birth_date, self.address,
               self.study_date, self.study_time, self.series_time, self.acquisition_time, self.accession,
               self.study_id, self.study_description, self.image_comments, self.history, self.private_value]
        for pn, prefix in ((self.referring, "Dr"), (self.performing, ""), (self.operator, "")):
            out += [self.person(pn, prefix), pn[0], pn[1]]
        return out


def patient_phi(rng: np.random.Generator, site_letter: str, index: int, *, female: bool) -> PatientPHI:
    """Identity, dates and free text of one patient; the index keeps MRN and accession unique."""
    family = str(rng.choice(_FAMILY))
    given = str(rng.choice(_GIVEN_F if female else _GIVEN_M))
    study = dt.date(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 8 * 365)))
    age = int(rng.integers(25, 91))
    birth = study - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    seconds = int(rng.integers(7 * 3600, 22 * 3600))
    times = [_tm(seconds + k, int(rng.integers(0, 1_000_000))) for k in (0, 95, 131)]
    mrn = f"MRN-{site_letter}-{int(rng.integers(10, 100))}{index:04d}"
    accession = f"ACC{site_letter}{int(rng.integers(100_000, 1_000_000))}{index:03d}"
    doctors = [(str(rng.choice(_DOCTOR_FAMILY)), str(rng.choice(_DOCTOR_GIVEN))) for _ in range(3)]
    history = str(rng.choice(_HISTORY)).format(wells=int(rng.integers(3, 9)), hr=int(rng.integers(105, 140)),
                                               dd=int(rng.integers(600, 4000)), spo2=int(rng.integers(84, 93)))
    return PatientPHI(
        family=family,
        given=given,
        mrn=mrn,
        other_id=f"HCN-{int(rng.integers(10**8, 10**9))}-{site_letter}",
        birth_date=birth.strftime("%Y%m%d"),
        sex="F" if female else "M",
        age=f"{age:03d}Y",
        address=f"{int(rng.integers(2, 300))} {rng.choice(_STREETS)}, {rng.choice(_TOWNS)}",
        study_date=study.strftime("%Y%m%d"),
        study_time=times[0],
        series_time=times[1],
        acquisition_time=times[2],
        accession=accession,
        study_id=f"CT{site_letter}{int(rng.integers(1000, 10000))}{index:03d}",
        referring=doctors[0],
        performing=doctors[1],
        operator=doctors[2],
        study_description=f"CTPA {family} {given} query PE",
        image_comments=f"{given} {family} ({mrn}): {history}",
        history=history,
        private_value=f"{mrn}|{family}^{given}|{accession}",
    )


def _tm(seconds: int, micro: int) -> str:
    h, rem = divmod(seconds, 3600)
    return f"{h:02d}{rem // 60:02d}{rem % 60:02d}.{micro:06d}"
