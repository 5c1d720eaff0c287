"""Embedded English word lists: keys for the needle tasks, vocabularies for RULER's CWE.

RULER (NVIDIA) draws its keys ("fluffy-cabbage") and its common-words vocabulary from the
`wonderwords` package's adjective, noun and verb lists. We embed our own lists of plain, common words
instead, so that the harness needs no extra package and gives the same prompts on every machine for a
given seed. The tasks keep RULER's shapes (adjective-noun keys, one-word list items); the words differ,
so the scores are "RULER-style", not leaderboard numbers.

`pseudo_words` makes pronounceable made-up words for when a list runs out (RULER switches to a larger
word file at long lengths for the same reason).
"""
from __future__ import annotations

import random

ADJECTIVES = tuple(sorted(set("""
able absent acid active actual adorable afraid agile alert alive amber ample ancient angry annual
anxious apt arctic ardent aromatic artistic ashamed asleep atomic august autumn awake aware awful
bad bald bare basic bashful bitter black bland blank bleak blind blissful blond blue blunt bold bony
bored bossy brave brief bright brisk broad broken bronze brown bumpy busy calm candid capable careful
casual cautious central certain cheap cheerful chilly chubby civic civil classic clean clear clever
close cloudy clumsy coarse cold colossal common complex cool copper cosmic cosy crazy creamy crisp
crooked crude cruel crystal cuddly curious curly curved cute damp dark dear decent deep dense devoted
direct dirty distant dizzy double drab dry dull dusty eager early earnest easy elastic electric
elegant empty endless equal erratic even exact exotic faint fair faithful famous fancy far fast fat
fearless feeble festive few fierce filthy fine firm first fixed flat flawless fluffy fluid foggy
fond formal fragile frail frank free fresh friendly frozen frugal full funny fuzzy gentle giant
gifted glad gleaming glossy golden good graceful grand gray great green grim gritty gross grumpy
guilty handy happy hard harsh hasty healthy heavy helpful hidden high hollow holy honest hopeful
huge humble hungry icy idle ill immense jolly juicy keen kind large last late lazy lean left light
little lively lone long loose loud lovely loyal lucky lush mad magic major mellow merry mighty mild
minor misty modern modest moist muddy mute narrow naval neat nervous new nice nimble noble noisy
normal nosy novel odd oily old open orange ornate pale pastel plain plastic pleasant plump polite
poor proud pure purple quick quiet rapid rare raw ready real red regal rich rigid ripe rough round
royal rural rusty sad safe salty sandy scarce secret sharp shiny short shy silent silky silver
simple slim slow small smart smooth snowy soft solid sour spare spicy splendid square stale steady
steep sticky stiff still stormy strange strict strong sturdy subtle sudden sunny super sweet swift
tall tame tender tense thick thin thirsty tidy tight tiny tired tough tranquil tropical true
twin ugly upbeat urban useful vague valid vast velvet violet vital vivid warm wary weak weary wet
white whole wide wild windy wise witty wooden woolly yellow young zany zealous
""".split())))

NOUNS = tuple(sorted(set("""
acorn actor airport album alley almond anchor angle ankle answer anthem apple apron arch arena army
arrow artist atlas attic aunt author avenue award axe badge bagel baker balcony ball balloon bamboo
banana band banjo bank barn barrel basket bat battery beach beacon bean bear beard bed bee beetle
bell belt bench berry bicycle bird biscuit blanket blender blossom boat bone book boot bottle boulder
bowl box bracelet branch bread breeze brick bridge broom brush bubble bucket buffalo bulb bundle
butter button cabbage cabin cactus cake camel camera camp canal candle canoe canyon cap captain car
card carpet carrot cart castle cat cave ceiling cello chair chalk channel cheese cherry chess
chicken chimney chin circle city clarinet clock closet cloud clover coach coast coat cobra coconut
coffee coin collar comet compass cookie copper coral cord corner cottage cotton couch cousin cow
crab cradle crane crayon creek cricket crow crown crystal cup curtain cushion daisy dancer deer
desert desk diamond dinner doctor dog doll dolphin door dragon drawer dream dress drum duck dune
eagle ear earth easel egg elbow elephant elm engine envelope eraser falcon farm feather fence fern
ferry field fig finger fire fish flag flame flute fog forest fork fossil fountain fox frame frog
fruit galaxy garage garden garlic gate gear ghost giraffe glacier glass glove goat gold goose grape
grass guitar gull hammer hamster harbor harp hat hawk hazel heart hedge helmet hero hill hippo
honey hook horizon horn horse hotel house igloo island ivory jacket jaguar jar jelly jewel jungle
kettle key kitten kite knee knife koala ladder lake lamp lantern leaf lemon leopard letter library
lily lime lion lizard llama lobster lock locket lodge magnet mango map maple marble market mask
meadow melon mirror mitten monkey moon moose moss mountain mouse mug museum mushroom needle nest
net newt night noodle notebook nut oak oar ocean octopus office olive onion orange orchard orchid
otter owl oyster paddle page pail palace panda paper parrot peach peanut pear pearl pebble pencil
penguin pepper piano pickle picture pie pig pillow pilot pine pipe planet plate plum pocket pond
pony poppy potato puddle pumpkin puppet puzzle quail quilt rabbit radio rain raven ribbon rice river
road robin rocket rope rose ruby saddle sail salad salmon sand scarf school scissors seal seed shark
sheep shelf shell ship shoe shovel sink skate sky sled snail snake sock sofa soup spider spoon
squirrel stable star statue stone stool storm stove straw stream street sugar suitcase sun swan
sweater table tail teapot temple tent thimble thunder tiger toast tomato tower toy tractor train
tree trumpet tulip tunnel turtle umbrella valley vase vest village violin volcano wagon wall walnut
wand watch wave whale wheat wheel whistle willow window wing wizard wolf wood yacht yarn zebra
""".split())))

VERBS = tuple(sorted(set("""
accept add admire allow answer appear argue arrange arrive ask bake balance bathe beg behave bless
boil borrow bounce breathe bring brush build bump calculate call camp care carry carve catch change
chase cheer chew choose clap clean climb close coach collect comb compare count cover crawl cross
cry cycle dance decide deliver describe design dig divide drag draw dream drink drive drop dry earn
eat enjoy enter escape explain fetch fill find fix float fly fold follow gather glow grab greet grin
grow guard guess hammer hang help hike hop hug hum hunt hurry imagine invent invite iron jog join
juggle jump kick kneel knit knock laugh launch lead learn lift listen load march marry measure melt
mend mix move nod notice obey open order pack paddle paint park pass pause pick plant play plug
polish pour pray print promise pull punch push race rain reach read relax remember repair reply
rescue rest return ride ring roll row rub run sail save scrub search sew shake share shave shine
shiver shop shout sing sip sit skate ski skip sleep slide smell smile sneeze sniff snore solve sort
spell spill spin splash spray squeeze stack stamp stare start stay steer step stir stitch stretch
study swim swing talk taste teach thank throw tickle touch trace trade travel trust try tug turn
type unlock vanish visit wait walk wander want warn wash watch wave weave whisper whistle wink wish
wonder work worry wrap write yawn yell zip
""".split())))


def pseudo_words(n: int, rng: random.Random, *, exclude: set[str] = frozenset()) -> list[str]:
    """n distinct pronounceable made-up words (consonant-vowel syllables), none in `exclude`."""
    cons, vows = "bcdfghjklmnprstvz", "aeiou"
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(2, 4)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def key_pairs(n: int, rng: random.Random) -> list[str]:
    """n distinct adjective-noun keys ("fluffy-cabbage"), as RULER's word keys."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out
