"""Write the demo catalog `examples/catalog.jsonl`: 240 products in 8 categories, from fixed templates.

Deterministic (a seeded RNG over fixed templates): running it again gives the same file byte for byte, which
`tests/unit/test_catalog.py` checks. About a third of the descriptions are HTML, as a shop CMS exports them.

    .venv/bin/python tools/make_catalog.py [--out examples/catalog.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_CATEGORY = 30

# category -> (id prefix, brands, product types). A type is (name, price range, sentences about it, features).
CATEGORIES: dict[str, tuple[str, list[str], list[tuple[str, tuple[int, int], list[str], list[str]]]]] = {
    "audio": ("AUD", ["Sonara", "Aurel", "Basswell", "Kestrel Audio"], [
        ("Wireless Noise Cancelling Headphones", (89, 399),
         ["Over-ear wireless headphones with active noise cancelling for flights, trains and open offices.",
          "Bluetooth 5.3 headphones with deep bass, a transparency mode and a foldable headband."],
         ["up to 40 hours of battery life", "multipoint Bluetooth pairing", "memory foam ear cushions",
          "USB-C fast charging", "built-in microphones for clear calls"]),
        ("True Wireless Earbuds", (49, 249),
         ["In-ear wireless earbuds with a pocket charging case and touch controls.",
          "Compact Bluetooth earbuds with noise cancelling and rich, balanced sound."],
         ["IPX4 sweat resistance", "wireless charging case", "six hours of playback per charge",
          "three sizes of silicone ear tips", "low-latency gaming mode"]),
        ("Sports Earbuds", (39, 149),
         ["Secure-fit wireless sport earbuds with ear hooks that stay put during workouts.",
          "Sweatproof Bluetooth earbuds tuned for punchy bass while you train."],
         ["IPX7 waterproof", "ear hooks for a secure fit", "ambient sound mode for road safety"]),
        ("Portable Bluetooth Speaker", (29, 199),
         ["Waterproof portable Bluetooth speaker with 360-degree sound for the beach and the park.",
          "Rugged wireless speaker with big bass and a built-in strap."],
         ["IP67 dust and water resistance", "stereo pairing of two speakers", "20 hours of playtime",
          "built-in power bank"]),
        ("Soundbar with Subwoofer", (149, 699),
         ["Home cinema soundbar with a wireless subwoofer and Dolby Atmos.",
          "Slim TV soundbar with clear dialogue mode and HDMI eARC."],
         ["HDMI eARC", "wireless subwoofer", "night mode", "Wi-Fi and Bluetooth streaming"]),
        ("Turntable", (119, 499),
         ["Belt-drive record player with a built-in phono preamp.",
          "Vinyl turntable with a diamond stylus and Bluetooth output to wireless speakers."],
         ["33 and 45 rpm", "switchable phono preamp", "aluminium platter"]),
        ("USB Microphone", (59, 179),
         ["Cardioid USB condenser microphone for podcasts, streaming and voice calls.",
          "Plug-and-play studio microphone with a headphone jack for zero-latency monitoring."],
         ["24-bit/96 kHz recording", "mute button", "desk stand and pop filter included"]),
        ("Wired In-Ear Monitors", (29, 299),
         ["Wired in-ear monitors with dual drivers for musicians and audiophiles.",
          "Detachable-cable IEM earphones with detailed, neutral sound."],
         ["detachable MMCX cable", "noise-isolating foam tips", "hard carrying case"]),
    ]),
    "laptops": ("LAP", ["Voltbook", "Northpeak", "Lumen", "Arcadia"], [
        ("13-inch Ultrabook", (799, 1899),
         ["Thin and light 13-inch laptop with an all-day battery and an aluminium unibody.",
          "Ultraportable notebook with a bright 2.8K display and a backlit keyboard."],
         ["16 GB RAM", "1 TB NVMe SSD", "Wi-Fi 6E", "fingerprint reader", "two Thunderbolt 4 ports"]),
        ("15.6-inch Gaming Laptop", (999, 2799),
         ["Gaming laptop with an RTX graphics card and a 165 Hz display.",
          "High-refresh gaming notebook with per-key RGB keyboard and advanced cooling."],
         ["32 GB DDR5 RAM", "RTX 4070 GPU", "165 Hz QHD screen", "vapour chamber cooling"]),
        ("2-in-1 Convertible Laptop", (599, 1499),
         ["Convertible laptop with a 360-degree hinge, touchscreen and active pen support.",
          "Flexible 14-inch 2-in-1 that works as a notebook, tent or tablet."],
         ["touchscreen with stylus", "12-hour battery", "USB-C charging"]),
        ("14-inch Business Laptop", (899, 1999),
         ["Durable business laptop with a privacy screen and enterprise security.",
          "Lightweight 14-inch workstation for the office and travel."],
         ["TPM 2.0 security chip", "privacy shutter webcam", "spill-resistant keyboard", "LTE option"]),
        ("Chromebook", (249, 599),
         ["Fast-booting Chromebook for school, browsing and cloud apps.",
          "Affordable 14-inch Chromebook with long battery life."],
         ["automatic updates", "10-hour battery", "full HD display"]),
        ("16-inch Creator Laptop", (1499, 3299),
         ["Creator laptop with a colour-accurate 16-inch OLED display for photo and video editing.",
          "Powerful notebook for designers with a large touchpad and pro graphics."],
         ["100% DCI-P3 OLED display", "64 GB RAM", "2 TB SSD", "SD card reader"]),
        ("USB-C Docking Station", (89, 249),
         ["USB-C laptop docking station with dual monitor output and Ethernet.",
          "Single-cable laptop dock that charges your notebook at 100 W."],
         ["two HDMI ports", "gigabit Ethernet", "100 W power delivery"]),
    ]),
    "phones": ("PHN", ["Orbit", "Nexa", "Pulse Mobile", "Tern"], [
        ("6.7-inch Flagship Smartphone", (799, 1399),
         ["Flagship Android smartphone with a 6.7-inch AMOLED screen and a triple camera.",
          "Premium 5G phone with a 200 MP camera and all-day battery."],
         ["120 Hz display", "256 GB storage", "5G", "wireless charging", "IP68 water resistance"]),
        ("Compact Smartphone", (499, 899),
         ["Compact 6.1-inch smartphone that fits in one hand.",
          "Small 5G phone with a flagship chip and a great camera."],
         ["6.1-inch OLED display", "128 GB storage", "dual SIM"]),
        ("Budget Android Phone", (129, 299),
         ["Affordable Android phone with a large battery and a 90 Hz screen.",
          "Entry-level smartphone with expandable storage."],
         ["5000 mAh battery", "microSD slot", "headphone jack"]),
        ("Foldable Phone", (999, 1899),
         ["Foldable smartphone that opens into a small tablet.",
          "Flip phone reinvented: a foldable 5G smartphone with a cover screen."],
         ["flexible OLED display", "hinge rated for 200,000 folds", "multitasking split screen"]),
        ("Protective Phone Case", (15, 49),
         ["Shockproof phone case with raised edges to protect the screen and camera.",
          "Slim clear phone case compatible with magnetic wireless charging."],
         ["drop tested to 3 m", "magnetic ring", "anti-yellowing"]),
        ("USB-C Fast Charger", (19, 69),
         ["65 W GaN USB-C fast charger for phones, tablets and laptops.",
          "Compact wall charger with two USB-C ports."],
         ["GaN technology", "foldable plug", "power delivery 3.0"]),
        ("Power Bank 20000 mAh", (29, 89),
         ["High-capacity power bank to charge your phone up to five times.",
          "Slim portable charger with USB-C input and output."],
         ["20000 mAh capacity", "LED charge indicator", "charges two devices at once"]),
    ]),
    "kitchen": ("KIT", ["Casa Forte", "Brightmill", "Cuoco", "Hearthline"], [
        ("Espresso Machine", (199, 899),
         ["Semi-automatic espresso machine with a 15-bar pump and a steam wand for latte art.",
          "Home espresso maker for barista-style coffee, cappuccino and flat white."],
         ["15-bar pressure", "milk frothing steam wand", "removable water tank", "stainless steel body"]),
        ("Burr Coffee Grinder", (49, 249),
         ["Conical burr coffee grinder with 40 grind settings from espresso to French press.",
          "Quiet electric coffee grinder for fresh, even grounds."],
         ["40 grind settings", "conical steel burrs", "anti-static container"]),
        ("Cast Iron Skillet 28 cm", (29, 89),
         ["Pre-seasoned cast iron skillet for searing steak, baking cornbread and campfire cooking.",
          "Heavy cast iron frying pan that keeps heat and lasts for generations."],
         ["pre-seasoned with vegetable oil", "oven safe", "works on induction hobs"]),
        ("Non-Stick Frying Pan", (19, 79),
         ["PFOA-free non-stick frying pan for eggs, pancakes and stir fries.",
          "Hard-anodised non-stick pan with a stay-cool handle."],
         ["induction compatible", "dishwasher safe", "oven safe to 200 C"]),
        ("Chef's Knife 20 cm", (39, 189),
         ["Forged stainless steel chef's knife with a razor-sharp edge.",
          "Japanese-style chef's knife for slicing, dicing and chopping vegetables."],
         ["full tang", "ergonomic handle", "German steel"]),
        ("Stand Mixer", (199, 599),
         ["Tilt-head stand mixer for bread dough, cakes and meringue.",
          "Powerful kitchen mixer with a 5-litre stainless steel bowl."],
         ["dough hook, whisk and beater", "10 speeds", "splash guard"]),
        ("Air Fryer", (69, 229),
         ["Digital air fryer that cooks crispy fries with little or no oil.",
          "Large air fryer with dual baskets for whole family meals."],
         ["5.5 litre basket", "8 cooking presets", "dishwasher-safe basket"]),
        ("Enamelled Dutch Oven", (59, 329),
         ["Enamelled cast iron Dutch oven for stews, braises and no-knead bread.",
          "Heavy casserole pot that goes from the stove top to the oven."],
         ["5.2 litre capacity", "self-basting lid", "oven safe to 250 C"]),
    ]),
    "sports": ("SPT", ["Stridex", "Alpenlauf", "Kinetic", "Trailborn"], [
        ("Road Running Shoes", (79, 189),
         ["Cushioned road running shoes for daily training and long runs.",
          "Lightweight running shoes with a responsive foam midsole for tempo runs and races."],
         ["breathable mesh upper", "8 mm heel-to-toe drop", "reflective details", "carbon plate option"]),
        ("Trail Running Shoes", (99, 199),
         ["Trail running shoes with a grippy lugged outsole for mud, rock and roots.",
          "Waterproof trail runners with a rock plate and a protective toe cap."],
         ["5 mm lugs", "waterproof membrane", "rock plate"]),
        ("Running Jacket", (59, 169),
         ["Lightweight, packable running jacket that blocks wind and light rain.",
          "Reflective running jacket for winter runs in the dark."],
         ["reflective print", "packs into its own pocket", "breathable back vent"]),
        ("Running Socks 3-Pack", (14, 29),
         ["Cushioned anti-blister running socks with arch support.",
          "Merino wool running socks that stay dry on long runs."],
         ["seamless toe", "moisture wicking", "left and right specific fit"]),
        ("GPS Running Watch", (149, 599),
         ["GPS running watch with heart rate, pace and training load.",
          "Multisport GPS watch for running, cycling and swimming with offline maps."],
         ["wrist heart rate", "two-week battery", "interval training plans", "offline maps"]),
        ("Running Hydration Vest", (49, 149),
         ["Trail running hydration vest with two soft flasks.",
          "Lightweight running vest for ultra marathons with room for a jacket."],
         ["two 500 ml soft flasks", "phone pocket", "whistle"]),
        ("Yoga Mat", (19, 99),
         ["Non-slip yoga mat with alignment lines for yoga, pilates and stretching.",
          "Thick exercise mat that cushions knees and joints."],
         ["6 mm thick", "carrying strap", "natural rubber"]),
        ("Adjustable Dumbbells", (99, 399),
         ["Adjustable dumbbells that replace a whole rack for home strength training.",
          "Quick-change dumbbell set from 2 to 24 kg."],
         ["dial weight selection", "storage tray", "2-24 kg per hand"]),
    ]),
    "books": ("BOK", ["Harbor House", "Quill & Co", "Northwind Press", "Lanternfish Books"], [
        ("Science Fiction Novel", (9, 24),
         ["A science fiction novel about the first colony ship to reach a distant star.",
          "Space opera paperback full of starships, alien contact and political intrigue."],
         ["paperback", "winner of a readers' award", "first book of a trilogy"]),
        ("Fantasy Epic", (10, 29),
         ["An epic fantasy of dragons, exiled queens and an ancient magic reawakening.",
          "Hardcover fantasy saga with a fold-out map of the realm."],
         ["hardcover", "illustrated map", "700 pages"]),
        ("Crime Thriller", (8, 22),
         ["A gripping crime thriller: a detective hunts a killer through a snowbound city.",
          "Page-turning mystery novel with a twist you will not see coming."],
         ["paperback", "bestseller", "standalone story"]),
        ("Italian Cookbook", (19, 39),
         ["A cookbook of Italian home cooking: pasta by hand, slow sauces and simple desserts.",
          "Recipes from a family trattoria, with step-by-step photographs."],
         ["120 recipes", "hardcover", "photographed step by step"]),
        ("World History", (15, 35),
         ["A readable history of the world from the first cities to the digital age.",
          "Narrative history book that connects empires, trade and ideas."],
         ["maps and timelines", "hardcover", "index and notes"]),
        ("Children's Picture Book", (6, 16),
         ["A bedtime picture book about a little fox who is afraid of the dark.",
          "Colourful picture book for ages 3 to 6 with rhyming text."],
         ["board pages", "ages 3-6", "read-aloud rhymes"]),
        ("Python Programming Guide", (29, 59),
         ["A practical guide to Python programming with projects and exercises.",
          "Learn to code in Python: data, automation and web basics."],
         ["exercises with solutions", "covers Python 3.12", "downloadable code"]),
    ]),
    "toys": ("TOY", ["Tinkerly", "Little Oak", "Bricktown", "Zoomi"], [
        ("Wooden Building Blocks", (19, 49),
         ["Natural wooden building blocks for toddlers, sanded smooth and painted with safe colours.",
          "Set of 100 wooden blocks in a storage bag for creative play."],
         ["100 pieces", "non-toxic paint", "ages 1+"]),
        ("Construction Brick Set", (24, 149),
         ["Construction brick set to build a fire station with minifigures.",
          "Creative brick box with 900 pieces and ideas booklet."],
         ["900 pieces", "compatible with major brands", "ages 6+"]),
        ("Remote Control Car", (29, 119),
         ["Off-road remote control car with 4WD and a rechargeable battery.",
          "Fast RC stunt car that flips and spins 360 degrees."],
         ["2.4 GHz remote", "30 km/h top speed", "rechargeable battery"]),
        ("Plush Teddy Bear", (14, 39),
         ["Soft plush teddy bear, machine washable and safe from birth.",
          "Cuddly teddy bear with embroidered eyes."],
         ["machine washable", "35 cm tall", "ages 0+"]),
        ("Jigsaw Puzzle 1000 Pieces", (12, 29),
         ["1000-piece jigsaw puzzle of a mountain lake at sunrise.",
          "Family jigsaw puzzle with a poster for reference."],
         ["1000 pieces", "70 x 50 cm finished", "recycled cardboard"]),
        ("Family Board Game", (19, 49),
         ["Strategy board game for 2 to 5 players about building trade routes.",
          "Fast family board game that takes 30 minutes to play."],
         ["2-5 players", "ages 8+", "30-60 minutes"]),
        ("STEM Robot Kit", (49, 129),
         ["Buildable robot kit that teaches kids to code with a tablet app.",
          "STEM kit with motors and sensors for young engineers."],
         ["block-based coding app", "rechargeable", "ages 8+"]),
    ]),
    "garden": ("GDN", ["Greenfold", "Rootwell", "Meadowline", "Terraform"], [
        ("Cordless Lawn Mower", (199, 599),
         ["Cordless electric lawn mower with two 36 V batteries for medium lawns.",
          "Quiet battery lawn mower with a mulching function and a 40-litre grass box."],
         ["36 V battery", "adjustable cutting height", "mulching plug"]),
        ("Hedge Trimmer", (69, 199),
         ["Cordless hedge trimmer with a 55 cm laser-cut blade.",
          "Lightweight hedge cutter for shaping shrubs and hedges."],
         ["55 cm blade", "anti-blocking system", "battery included"]),
        ("Expandable Garden Hose 30 m", (24, 69),
         ["Expandable garden hose that stretches to 30 m and shrinks back for storage.",
          "Kink-free garden hose with a 10-pattern spray gun."],
         ["10 spray patterns", "brass fittings", "30 m length"]),
        ("Pruning Shears", (14, 49),
         ["Bypass pruning shears for clean cuts on roses and shrubs.",
          "Ergonomic secateurs with a sap groove and safety lock."],
         ["SK5 steel blade", "cuts up to 20 mm", "safety lock"]),
        ("Raised Garden Bed", (49, 179),
         ["Galvanised steel raised garden bed for vegetables and herbs.",
          "Cedar raised bed kit that assembles without tools."],
         ["120 x 60 x 30 cm", "rust resistant", "no tools needed"]),
        ("Compost Bin 300 l", (39, 119),
         ["Garden compost bin that turns kitchen scraps into rich soil.",
          "Ventilated composter with an easy-access hatch."],
         ["300 litres", "recycled plastic", "lockable lid"]),
        ("Solar Patio String Lights", (19, 59),
         ["Solar-powered outdoor string lights for the patio, balcony and garden parties.",
          "Warm white festoon lights with shatterproof bulbs."],
         ["12 m length", "dusk-to-dawn sensor", "IP65 waterproof"]),
    ]),
}
MODELS = ["One", "Air", "Pro", "Max", "Lite", "S2", "X5", "Go", "Plus", "Studio", "Neo", "Ultra"]
COLOURS = ["black", "white", "graphite", "navy", "forest green", "sand", "red", "silver"]
GENERIC = {
    "audio": "Great sound for music, podcasts and calls.",
    "laptops": "Ships with a 2-year warranty and a USB-C charger.",
    "phones": "Unlocked and ready for any carrier.",
    "kitchen": "Easy to clean and built for everyday cooking.",
    "sports": "Designed with athletes for training and racing.",
    "books": "A perfect gift for readers of every age.",
    "toys": "Safety tested to EN 71 for children's toys.",
    "garden": "Built to last outdoors, season after season.",
}


def _description(rng: random.Random, category: str, sentences: list[str], features: list[str], colour: str) -> str:
    """Plain text or a CMS-style HTML fragment (about a third of the products)."""
    intro = rng.choice(sentences)
    picked = rng.sample(features, k=min(len(features), rng.randint(2, 4)))
    style = rng.random()
    if style < 0.18:
        items = "".join(f"<li>{f[0].upper() + f[1:]}</li>" for f in picked)
        return (f"<p>{intro}</p>\n<ul>{items}</ul>\n<p><em>Colour:</em> {colour}. "
                f"{GENERIC[category]}</p>")
    if style < 0.33:
        return (f"<p><strong>{intro}</strong><br/>Features: {', '.join(picked)} &amp; more.</p>"
                f"<p>Available in {colour}.&nbsp;{GENERIC[category]}</p>")
    return f"{intro} Features: {', '.join(picked)}. Colour: {colour}. {GENERIC[category]}"


def products() -> list[dict]:
    """The catalog's products, in file order."""
    rng = random.Random(2026)
    out: list[dict] = []
    for category, (prefix, brands, types) in CATEGORIES.items():
        for i in range(PER_CATEGORY):
            name, (lo, hi), sentences, features = types[i % len(types)]
            brand = brands[(i // len(types) + i) % len(brands)]
            model = MODELS[(i * 7 + len(category)) % len(MODELS)]
            colour = rng.choice(COLOURS)
            product = {
                "product_id": f"{prefix}-{1001 + i}",
                "name": f"{brand} {model} {name}",
                "description": _description(rng, category, sentences, features, colour),
                "category": category,
                "price": round(rng.uniform(lo, hi), 0) - 0.01,
            }
            if rng.random() < 0.9:  # stock is optional in the format: some products leave it out
                product["stock"] = rng.randint(0, 250)
            out.append(product)
    return out


def render() -> str:
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in products())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "catalog.jsonl")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(), encoding="utf-8")
    print(f"wrote {PER_CATEGORY * len(CATEGORIES)} products in {len(CATEGORIES)} categories to {args.out}")


if __name__ == "__main__":
    main()
