"""Text prompts for CLIP guidance: class names, synonyms, part-refined names, backgrounds, templates.

Written for tlg. Per class we keep

* ``names``: foreground names, the first being the plain label (PASCAL VOC / COCO spelling aside);
* ``parts``: part-refined names, phrases that make CLIP cover the whole object (clothes of a person,
  wheels of a car) instead of its most discriminative part, a known weakness of CLIP CAMs;
* ``background``: what is usually around the object (co-occurring stuff). Used as competing prompts in a
  softmax so that the CAM of "boat" does not light up the water: the background-prompt idea of
  DOTGraph (paper 002) and of TLG's co-occurring background text (paper 000).

A class text embedding is the normalised mean over ``TEMPLATES x (names + parts)`` (prompt ensembling,
Radford et al. 2021, sec. 3.1.4); a background concept's over ``BACKGROUND_TEMPLATES``.
Unknown class names (FSS-1000, synthetic) fall back to the name itself and the generic background.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "ClassPrompt", "TEMPLATES", "BACKGROUND_TEMPLATES", "GENERIC_BACKGROUND", "VOC_PROMPTS", "COCO_PROMPTS",
    "class_prompt", "foreground_texts", "background_concepts", "background_texts", "without_text",
]

TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
)
BACKGROUND_TEMPLATES = (
    "a photo of {}.",
    "a photo of the {}.",
    "a scene with {}.",
)
GENERIC_BACKGROUND = (
    "ground", "grass", "trees", "sky", "clouds", "a wall", "a floor", "a building", "a road", "water",
    "a table top", "a window", "mountains", "sand", "snow",
)


@dataclass(frozen=True)
class ClassPrompt:
    """Prompt material of one class (see the module docstring)."""

    names: tuple[str, ...]
    parts: tuple[str, ...] = ()
    background: tuple[str, ...] = ()


def _p(names: str, parts: str = "", background: str = "") -> ClassPrompt:
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    return ClassPrompt(split(names), split(parts), split(background))


VOC_PROMPTS: dict[str, ClassPrompt] = {
    "aeroplane": _p("aeroplane, airplane, aircraft, jet", "airplane with wings and tail",
                    "sky, clouds, runway, airport, tarmac"),
    "bicycle": _p("bicycle, bike", "bicycle with wheels and frame", "road, street, sidewalk, cyclist, fence"),
    "bird": _p("bird", "bird with wings and feathers", "sky, tree branch, water, grass, bird cage"),
    "boat": _p("boat, ship, sailboat", "boat with hull and sail", "water, sea, river, lake, harbour, dock"),
    "bottle": _p("bottle, plastic bottle, glass bottle", "bottle with cap and label",
                 "table, shelf, kitchen counter, hand"),
    "bus": _p("bus", "bus with windows and wheels", "road, street, bus stop, buildings, traffic"),
    "car": _p("car, automobile", "car with wheels and windows", "road, street, parking lot, traffic, buildings"),
    "cat": _p("cat, kitten", "cat with fur and tail", "sofa, bed, carpet, floor, window sill"),
    "chair": _p("chair, seat", "chair with legs and backrest", "floor, table, room, carpet, wall"),
    "cow": _p("cow, cattle", "cow with legs and horns", "grass, field, pasture, fence, farm"),
    "diningtable": _p("dining table, table", "table top with legs", "plates, food, chairs, dining room, floor"),
    "dog": _p("dog, puppy", "dog with fur and tail", "grass, lawn, floor, sofa, leash"),
    "horse": _p("horse, pony", "horse with legs and mane", "grass, field, fence, stable, rider"),
    "motorbike": _p("motorbike, motorcycle, scooter", "motorbike with wheels and handlebars",
                    "road, street, helmet, rider, parking lot"),
    "person": _p("person, people, human", "person with clothes, person with head and body",
                 "room, street, crowd, building, grass"),
    "pottedplant": _p("potted plant, house plant", "plant with leaves in a pot", "window, shelf, floor, wall, table"),
    "sheep": _p("sheep, lamb", "sheep with wool", "grass, field, pasture, fence, hill"),
    "sofa": _p("sofa, couch", "sofa with cushions", "living room, carpet, wall, cushions, lamp"),
    "train": _p("train, locomotive", "train with carriages",
                "railway, railroad track, station, platform, overhead wires"),
    "tvmonitor": _p("tv monitor, television, computer monitor, screen", "monitor with screen and frame",
                    "desk, keyboard, wall, living room, cabinet"),
}

COCO_PROMPTS: dict[str, ClassPrompt] = {
    "person": VOC_PROMPTS["person"],
    "bicycle": VOC_PROMPTS["bicycle"],
    "car": VOC_PROMPTS["car"],
    "motorcycle": VOC_PROMPTS["motorbike"],
    "airplane": VOC_PROMPTS["aeroplane"],
    "bus": VOC_PROMPTS["bus"],
    "train": VOC_PROMPTS["train"],
    "truck": _p("truck, lorry", "truck with cab and wheels", "road, highway, street, parking lot"),
    "boat": VOC_PROMPTS["boat"],
    "traffic light": _p("traffic light, traffic signal", "traffic light with red and green lamps",
                        "street, sky, pole, intersection, cars"),
    "fire hydrant": _p("fire hydrant, hydrant", "", "sidewalk, street, grass, curb"),
    "stop sign": _p("stop sign, road sign", "", "street, pole, sky, trees"),
    "parking meter": _p("parking meter", "", "sidewalk, street, parked cars, curb"),
    "bench": _p("bench, park bench", "bench with seat and legs", "park, grass, sidewalk, trees"),
    "bird": VOC_PROMPTS["bird"],
    "cat": VOC_PROMPTS["cat"],
    "dog": VOC_PROMPTS["dog"],
    "horse": VOC_PROMPTS["horse"],
    "sheep": VOC_PROMPTS["sheep"],
    "cow": VOC_PROMPTS["cow"],
    "elephant": _p("elephant", "elephant with trunk and legs", "savanna, grass, dirt, trees, water"),
    "bear": _p("bear, brown bear, polar bear", "bear with fur", "forest, rocks, grass, water, snow"),
    "zebra": _p("zebra", "zebra with stripes and legs", "savanna, grass, dirt, trees"),
    "giraffe": _p("giraffe", "giraffe with long neck and legs", "savanna, trees, grass, fence"),
    "backpack": _p("backpack, rucksack", "backpack with straps", "person, street, floor"),
    "umbrella": _p("umbrella, parasol", "umbrella with canopy and handle", "rain, street, beach, person"),
    "handbag": _p("handbag, purse, bag", "handbag with strap", "person, street, table"),
    "tie": _p("tie, necktie", "", "shirt, suit, person"),
    "suitcase": _p("suitcase, luggage", "suitcase with handle", "airport, floor, street, car trunk"),
    "frisbee": _p("frisbee, flying disc", "", "grass, park, sky, person"),
    "skis": _p("skis", "", "snow, ski slope, mountains"),
    "snowboard": _p("snowboard", "", "snow, ski slope, mountains"),
    "sports ball": _p("ball, sports ball, soccer ball, tennis ball", "", "grass, sports field, court"),
    "kite": _p("kite", "kite with tail", "sky, clouds, beach, park"),
    "baseball bat": _p("baseball bat, bat", "", "baseball field, dirt, person"),
    "baseball glove": _p("baseball glove, mitt", "", "baseball field, dirt, person"),
    "skateboard": _p("skateboard", "skateboard with wheels", "skate park, street, ramp"),
    "surfboard": _p("surfboard", "", "sea, waves, beach, water"),
    "tennis racket": _p("tennis racket, racket", "", "tennis court, person"),
    "bottle": VOC_PROMPTS["bottle"],
    "wine glass": _p("wine glass, glass", "", "table, dining room, bar"),
    "cup": _p("cup, mug", "cup with handle", "table, desk, saucer, kitchen"),
    "fork": _p("fork", "", "plate, table, food"),
    "knife": _p("knife", "", "cutting board, plate, table, food"),
    "spoon": _p("spoon", "", "bowl, plate, table"),
    "bowl": _p("bowl", "", "table, food, kitchen counter"),
    "banana": _p("banana", "", "table, fruit bowl, market"),
    "apple": _p("apple", "", "table, fruit bowl, tree, market"),
    "sandwich": _p("sandwich", "", "plate, table, napkin"),
    "orange": _p("orange, orange fruit", "", "table, fruit bowl, market"),
    "broccoli": _p("broccoli", "", "plate, table, vegetables"),
    "carrot": _p("carrot", "", "plate, cutting board, vegetables"),
    "hot dog": _p("hot dog, sausage in a bun", "", "plate, table, napkin"),
    "pizza": _p("pizza", "pizza with crust and toppings", "table, plate, box"),
    "donut": _p("donut, doughnut", "", "plate, box, table"),
    "cake": _p("cake", "", "plate, table, candles"),
    "chair": VOC_PROMPTS["chair"],
    "couch": VOC_PROMPTS["sofa"],
    "potted plant": VOC_PROMPTS["pottedplant"],
    "bed": _p("bed", "bed with pillows and blanket", "bedroom, wall, floor, lamp"),
    "dining table": VOC_PROMPTS["diningtable"],
    "toilet": _p("toilet", "toilet with seat and lid", "bathroom, tiles, sink, wall"),
    "tv": VOC_PROMPTS["tvmonitor"],
    "laptop": _p("laptop, notebook computer", "laptop with screen and keyboard", "desk, table, office"),
    "mouse": _p("computer mouse", "", "desk, mouse pad, keyboard"),
    "remote": _p("remote control, remote", "", "sofa, table, living room"),
    "keyboard": _p("keyboard, computer keyboard", "", "desk, monitor, office"),
    "cell phone": _p("cell phone, mobile phone, smartphone", "", "hand, table, person"),
    "microwave": _p("microwave oven, microwave", "", "kitchen, counter, cabinet"),
    "oven": _p("oven, stove", "", "kitchen, cabinets, counter"),
    "toaster": _p("toaster", "", "kitchen, counter"),
    "sink": _p("sink", "sink with faucet", "kitchen, bathroom, counter, tiles"),
    "refrigerator": _p("refrigerator, fridge", "", "kitchen, cabinets, floor"),
    "book": _p("book", "", "bookshelf, table, desk"),
    "clock": _p("clock, wall clock", "clock with face and hands", "wall, tower, building"),
    "vase": _p("vase", "", "flowers, table, shelf"),
    "scissors": _p("scissors", "", "table, paper, desk"),
    "teddy bear": _p("teddy bear, stuffed toy", "", "bed, sofa, child"),
    "hair drier": _p("hair drier, hair dryer, blow dryer", "", "bathroom, person, mirror"),
    "toothbrush": _p("toothbrush", "", "bathroom, sink, cup"),
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LOOKUP = {_key(k): v for table in (COCO_PROMPTS, VOC_PROMPTS) for k, v in table.items()}


def class_prompt(name: str) -> ClassPrompt:
    """Prompt material for a class name (VOC or COCO spelling, case/space/underscore-insensitive);
    unknown names become ``ClassPrompt((readable name,))`` with the generic background."""
    found = _LOOKUP.get(_key(name))
    if found is not None:
        return found
    return ClassPrompt((re.sub(r"[_\-]+", " ", name).strip(),))


def foreground_texts(name: str, templates: tuple[str, ...] = TEMPLATES, parts: bool = True) -> list[str]:
    """All prompt sentences of a class: templates x (names + parts)."""
    p = class_prompt(name)
    words = list(p.names) + (list(p.parts) if parts else [])
    return [t.format(w) for w in words for t in templates]


def background_concepts(name: str | None = None, generic: bool = True) -> list[str]:
    """Background concepts competing with class ``name``: its co-occurring stuff (+ the generic list),
    minus anything that names the class itself."""
    own = class_prompt(name) if name is not None else ClassPrompt(())
    items = list(own.background) + (list(GENERIC_BACKGROUND) if generic else [])
    banned = {_key(n) for n in own.names}
    out: list[str] = []
    for item in items:
        if _key(item) not in banned and item not in out:
            out.append(item)
    return out


def background_texts(concept: str, templates: tuple[str, ...] = BACKGROUND_TEMPLATES) -> list[str]:
    """Prompt sentences of one background concept."""
    return [t.format(concept) for t in templates]


def without_text(name: str) -> str:
    """DOTGraph's best background prompt (paper 002, Tab. BG-Prompt1): ``"this is an image without <class>."``"""
    return f"this is an image without {class_prompt(name).names[0]}."
