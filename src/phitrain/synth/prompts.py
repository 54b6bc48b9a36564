"""Built-in prompts of `phitrain synth`; every one can be replaced from the recipe.

The defaults follow the papers and Cosmopedia's lessons:
- phi-1 §2.2: textbooks whose diversity comes from constraints on topic and target audience; exercises as
  a function signature + docstring to complete, diversity from constrained function names;
- Cosmopedia: prompt = seed extract × audience × style; changing only the audience or style word still
  gave near-duplicates, so each audience and style below says *how* the text must differ;
- Phi-4 §2: self-revision against a rubric, instruction reversal for code, rewrites of web documents.
Placeholders are `{name}`; `{{` and `}}` are literal braces.
"""

AUDIENCES = (
    "young children who have never programmed: short sentences, everyday analogies, no jargon",
    "high school students meeting the subject for the first time: define every term, one idea per paragraph",
    "college students in a computer science course: precise definitions, complexity, edge cases and proofs "
    "of correctness where they matter",
    "professional developers: concise and idiomatic, focused on pitfalls, trade-offs and real-world use",
)

STYLES = (
    "academic textbook section: definitions first, then worked examples with Python code, then exercises",
    "narrative textbook section: a story-like explanation that builds intuition before the formal idea",
    "blog post: first person and conversational, solving one concrete problem end to end",
    "wikiHow-style tutorial: numbered steps, each with a short explanation and a code snippet",
)

_TEXTBOOK_RULES = ("Write for this audience and in this format, not a generic text: vocabulary, depth, "
                   "examples and structure must all follow from them. Include correct, runnable Python code "
                   "where it helps understanding. Start directly with the content: no title page, preface "
                   "or closing remarks.")

TEXTBOOK = (
    'Write a {style} about "{topic}" for {audience}.\n\n' + _TEXTBOOK_RULES,
    "You are writing part of a textbook that teaches coding.\nTopic: {topic}\nAudience: {audience}\n"
    "Format: {style}\n\nWrite this part of the book. " + _TEXTBOOK_RULES,
)

TEXTBOOK_SEEDED = (
    'Here is an extract from a document:\n"""\n{seed}\n"""\n\nWrite a {style} for {audience}, on the '
    "concepts this extract touches. Do not paraphrase the extract: teach the ideas behind it in depth. "
    + _TEXTBOOK_RULES,
)

TEXTBOOK_SEEDED_TOPIC = (
    'Here is an extract from a document:\n"""\n{seed}\n"""\n\nWrite a {style} about "{topic}" for '
    "{audience}, using the extract as a starting point. Do not paraphrase the extract. " + _TEXTBOOK_RULES,
)

_EXERCISE_RULES = ("The docstring states the task precisely: the inputs, the expected output, the edge cases, "
                   "and two or three examples in doctest form. Do not write the body. Reply with a single "
                   "```python code block.")

EXERCISE = (
    "Write a Python coding exercise about {topic}: only the signature and docstring of one function named "
    "`{function_name}`. " + _EXERCISE_RULES,
)

EXERCISE_FREE_NAME = (
    "Write a Python coding exercise about {topic}: only the signature and docstring of one function with a "
    "descriptive snake_case name. " + _EXERCISE_RULES,
)

EXERCISE_SOLVE = (
    "Here is the signature and docstring of a Python function:\n\n```python\n{exercise}\n```\n\n"
    "Write the complete function `{entry_point}`: the same signature and docstring, then a correct body. "
    "Use only the standard library. Reply with a single ```python code block."
)

EXERCISE_TESTS = (
    "Here is the signature and docstring of a Python function:\n\n```python\n{exercise}\n```\n\n"
    "Without implementing it, write a test function `check(candidate)`, where `candidate` is an "
    "implementation of `{entry_point}`: one `assert` per case, covering normal and edge cases, each "
    "comparing `candidate(...)` with the result the docstring specifies. Reply with a single ```python code "
    "block that defines only `check`."
)

REVERSAL_INSTRUCTION = (
    "Here is a Python function:\n\n```python\n{code}\n```\n\nWrite the instruction a programmer would need "
    "to write this function from scratch: its name and parameters, what it returns, and every rule and edge "
    "case it handles. Do not include any code. Reply with the instruction only.",
)

REVERSAL_REGENERATE = (
    "{instruction}\n\nWrite the Python function `{entry_point}` described above. Reply with a single "
    "```python code block."
)

REWRITE_SEED = (
    'Here is a document:\n"""\n{seed}\n"""\n\nRewrite it as {instructions} Keep every fact and piece of code '
    "that is correct, fix what is wrong, and leave out navigation text, advertising and boilerplate. Reply "
    "with the rewritten text only.",
)

REWRITE_FORMATS = {
    "textbook": "a section of a textbook: explain its concepts step by step, with worked examples and code "
                "where it helps.",
    "qa": "questions and answers: each question asks what a reader of the document would want to know, each "
          "answer is complete on its own.",
    "exercise": "exercises with solutions: two to four problems based on the document, each followed by a "
                "worked solution.",
    "discussion": "a discussion between a teacher and a student: the student asks questions and makes "
                  "mistakes, the teacher explains and corrects them.",
}

LONG_OUTLINE = (
    'Plan a long, in-depth {style} about "{topic}" for {audience}. Write an outline of 8 to 12 sections: one '
    "line per section, numbered 1., 2., ..., each a title and a sentence on what it covers. Reply with the "
    "outline only.",
)

LONG_SECTION = (
    'You are writing a long document about "{topic}" from this outline:\n\n{outline}\n\nThe text so far ends '
    'with:\n"""\n{previous}\n"""\n\nWrite section {number}, "{section}", in full: several paragraphs with '
    "examples and code where they help, continuing from the text so far without repeating it. Do not write "
    "other sections. Reply with the section text only."
)

RUBRIC = (
    "- Correct: every statement and every piece of code is right.\n"
    "- Clear: each idea is explained before it is used; no filler.\n"
    "- Self-contained: a reader needs nothing else to follow it.\n"
    "- Educational: it teaches reasoning, not only facts, with concrete examples.\n"
    "- Faithful to the request: topic, audience and format as asked."
)

CRITIQUE = (
    'Here is a draft:\n"""\n{draft}\n"""\n\nReview it against this rubric:\n{rubric}\n\nList every place where '
    "the draft falls short, most important first, and say how to fix each. Do not rewrite the draft."
)

REWRITE = (
    'Here is a draft:\n"""\n{draft}\n"""\n\nA reviewer checked it against this rubric:\n{rubric}\n\nand wrote:\n'
    "{critique}\n\nRewrite the draft so that it answers every point of the review, keeping its form (code "
    "stays code, in one ```python block). Reply with the revised draft only."
)
