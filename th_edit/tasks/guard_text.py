"""A fixed set of plain English paragraphs (written for th_edit) for the general-text guard metric."""

GUARD_TEXTS: tuple[str, ...] = (
    "The village sits at the bend of a slow river, where the water widens into a shallow pool. In summer, "
    "children wade across it to reach the meadow on the other side, and in winter the pool freezes thin "
    "enough that nobody is allowed to walk on it. The old stone bridge upstream was built more than two "
    "hundred years ago and still carries the road to the market town.",
    "Bread is made from flour, water, salt and yeast. The yeast feeds on the sugars in the flour and "
    "releases gas, which makes the dough rise. Kneading develops the gluten, a network of proteins that "
    "traps the gas and gives the loaf its structure. A hot oven then sets the crumb and browns the crust.",
    "When the train stopped at the small station, only one passenger stepped off. She carried a brown "
    "suitcase and looked around as if she expected someone to meet her. The platform was empty, so she "
    "sat down on a bench, opened a newspaper and waited for the rain to pass.",
    "A good map leaves things out. If it showed every tree, every fence and every stone, it would be as "
    "large and as confusing as the land itself. Mapmakers choose what matters for the reader, such as "
    "roads for drivers, contour lines for walkers or depths for sailors, and draw only that.",
    "The library opens at nine in the morning and closes at six in the evening. Visitors may borrow up to "
    "ten books at a time for three weeks. Newspapers and reference books must stay in the reading room, "
    "and the computers on the second floor can be booked for one hour at the front desk.",
    "Bees visit flowers to collect nectar and pollen. As they move from one flower to the next, pollen "
    "sticks to their bodies and is carried along, which allows many plants to produce seeds and fruit. "
    "Farmers who grow apples, almonds or berries often rent hives during the spring so that their crops "
    "are well pollinated.",
    "He had promised to fix the kitchen window before the weekend, but on Friday evening it was still "
    "stuck. After an hour with a screwdriver and a can of oil, the frame finally moved. He opened it, "
    "closed it again twice to be sure, and then went to tell his sister that the job was done.",
    "Most of the water on Earth is salt water in the oceans. Only a small part is fresh water, and much of "
    "that is frozen in glaciers and ice caps or hidden underground. Rivers and lakes, which supply most "
    "cities, hold a tiny fraction of the total, so careful use of water matters in dry regions.",
)
