r"""Hard grading cases of issue 18, by kind: (id, kind, response, gold, expected status).

Written for this project (none copied from an evaluation set): several boxed answers, answers without a box,
long responses, invalid Unicode, normalization gaps, and tolerance traps. Each kind has right answers that must
pass and wrong answers or hedges that must not (false-positive traps).
"""

from __future__ import annotations

from reward.extraction import TAIL_CHARS

OK, NO, NA = "correct", "incorrect", "no_answer"

_PAD = "We check the computation once more, line by line, and every step holds up. "
_LONG = _PAD * 1_400  # ~105k characters of reasoning
_MB = _PAD * 14_000  # ~1 MB


def B(x: str) -> str:
    return f"Putting it together, the result is $\\boxed{{{x}}}$."


def _straddle(content: str) -> str:
    """A final box whose opening lies before the graded tail's cut and whose closing lies after it."""
    box = f"\\boxed{{{content}}}"
    # The graded tail starts 80 characters before the end of `after`: inside the box's padding.
    after = (" The derivation above is complete and every step was checked twice." * 260)[: TAIL_CHARS - 80]
    return _LONG + "So the expression simplifies to $" + box[:-150] + " " * 150 + box[-150:] + "$." + after


MULTI_BOX = [
    ("mb-roots-or", r"Factoring, $(x-2)(x+3)=0$, so $x=\boxed{2}$ or $x=\boxed{-3}$.", "-3, 2", OK),
    ("mb-three-and", r"The solutions are $\boxed{1}$, $\boxed{4}$ and $\boxed{9}$.", r"\{1,4,9\}", OK),
    ("mb-three-wrong", r"The solutions are $\boxed{1}$, $\boxed{4}$ and $\boxed{9}$.", r"\{1,4,8\}", NO),
    ("mb-assign-boxes", r"Hence \boxed{x=2}, \boxed{x=3}.", r"x=2 \text{ or } x=3", OK),
    ("mb-pm-gold", r"The roots are $\boxed{5}$ and $\boxed{-5}$.", r"\pm 5", OK),
    ("mb-intermediate-then-final", r"First $a=\boxed{3}$. Then the perimeter is $4a=\boxed{12}$.", "12", OK),
    ("mb-intermediate-not-final", r"First $a=\boxed{3}$. Then the perimeter is $4a=\boxed{12}$.", "3", NO),
    ("mb-final-phrase", r"So $b=\boxed{4}$, and the final answer is $\boxed{20}$.", "20", OK),
    ("mb-units-sentence", r"Each side is $\boxed{3}$ cm long, so the area is $\boxed{9}$.", "9", OK),
    ("mb-hedge-either", r"It is either $\boxed{5}$ or $\boxed{6}$.", "5", NA),
    ("mb-list-missing", r"So $x=\boxed{2}$ and $x=\boxed{3}$.", "2, 3, 4", NO),
    ("mb-list-extra", r"So $x=\boxed{2}$, $x=\boxed{3}$ and $x=\boxed{4}$.", "2, 3", NO),
    ("mb-points", r"The curves meet at $\boxed{(1,2)}$ and $\boxed{(3,4)}$.", "(1,2), (3,4)", OK),
    ("mb-same-value-forms", r"That is $\boxed{\frac12}$, i.e. $\boxed{0.5}$.", "1/2", OK),
    ("mb-paragraph-retry", "My first try gave \\boxed{7}.\n\nRechecking the sum, it is \\boxed{8}.", "8", OK),
    ("mb-paragraph-retry-wrong", "My first try gave \\boxed{7}.\n\nRechecking the sum, it is \\boxed{8}.", "7", NO),
    ("mb-conjugate-roots", r"The roots are \boxed{1+\sqrt{2}} and \boxed{1-\sqrt{2}}.", r"1\pm\sqrt{2}", OK),
    ("mb-conjugate-roots-wrong", r"The roots are \boxed{1+\sqrt{2}} and \boxed{1-\sqrt{3}}.", r"1\pm\sqrt{2}", NO),
    ("mb-tuple-parts", r"Thus $a = \boxed{2}$, $b = \boxed{5}$.", "(2,5)", OK),
    ("mb-tuple-parts-swapped", r"Thus $a = \boxed{5}$, $b = \boxed{2}$.", "(2,5)", NO),
    ("mb-parts-by-paragraph", "**Part (a):** $\\boxed{12}$\n\n**Part (b):** $\\boxed{7}$", "12, 7", OK),
    ("mb-same-value-aside", r"So $\boxed{4}$ (or $\boxed{2^2}$).", "4", OK),
    ("mb-sentences-solutions", r"One root is $\boxed{2}$. The other root is $\boxed{3}$.", r"\{2,3\}", OK),
    ("mb-align-rows", r"\begin{align} x &= \boxed{2} \\ x &= \boxed{3} \end{align}", "3, 2", OK),
    ("mb-align-rows-hedge", r"\begin{align} x &= \boxed{2} \\ x &= \boxed{3} \end{align}", "2", NA),
    ("mb-think-then-final", "<think>\nmaybe \\boxed{3}\n</think>\n\nThe answer is $\\boxed{4}$.", "3", NO),
]

NO_BOX = [
    ("nb-bold-answer-line", "Adding the two parts gives 12.\n\n**Answer: 12**", "12", OK),
    ("nb-bold-only-line", "Adding the two parts gives the total.\n\n**12**", "12", OK),
    ("nb-final-answer-dollars", r"The final answer is $\frac{3}{4}$.", "0.75", OK),
    ("nb-final-answer-colon", "After simplifying:\nFinal answer: 7", "7", OK),
    ("nb-final-answer-colon-wrong", "After simplifying:\nFinal answer: 8", "7", NO),
    ("nb-therefore-answer-is", "Therefore, the answer is 15.", "15", OK),
    ("nb-answer-dash", "Collecting the terms.\nAnswer — 42", "42", OK),
    ("nb-bold-final-answer-math", "We are done.\n\n**Final Answer:** $x = 3$", "3", OK),
    ("nb-closing-sentence", "She started with 30 and gave away 6.\nThus, Maria has 24 stickers left.", "24", OK),
    ("nb-closing-sentence-wrong", "She started with 30 and gave away 6.\nThus, Maria has 25 stickers left.", "24", NO),
    ("nb-answer-is-bold", "So the answer is **9**.", "9", OK),
    ("nb-answer-is-paren-math", r"The answer is: \(2\sqrt{3}\)", r"\sqrt{12}", OK),
    ("nb-retracted", "Answer: 5\nWait, that is wrong. Let me redo the count.", "5", NA),
    ("nb-hence-min", "Completing the square shows the vertex.\nHence, the minimum value is $-4$.", "-4", OK),
    ("nb-number-word-sentence", "We list them all.\nIn total, there are twelve ways.", "12", OK),
    ("nb-last-phrase-wins", "The answer is not 6; redoing the last step, the answer is 8.", "8", OK),
    ("nb-no-cue-middle-numbers", "We computed 3 + 4 = 7 and then 7 * 5 = 35. I think that is about right.", "35", NA),
    ("nb-no-cue-two-values", "The area is 35 and the perimeter is 24, but the volume is still unknown.", "35", NA),
    ("nb-steps-only", "Step 1: take 5 apples.\nStep 2: take 7 pears.", "7", NA),
    ("nb-italic-answer", "Summing up.\n*Answer*: 64", "64", OK),
    ("nb-display-after-heading", "All done.\n\n### Final Answer\n\\[\n\\frac{2}{5}\n\\]", "0.4", OK),
    ("nb-gsm8k-hashes", "She pays 5 * 9 = 45 dollars.\n#### 45", "45", OK),
    ("nb-reverse-phrase", "Adding up the cases, 18 is the final answer.", "18", OK),
    ("nb-answer-sentence", "**Answer: The number of marbles is 31.**", "31", OK),
    ("nb-negated", "The answer is not 5.", "5", NA),
    ("nb-phrase-after-box-no-value", "So $\\boxed{7}$.\n\nThe answer is boxed above.", "7", OK),
    ("nb-two-numbers-closing", "Therefore, there are 3 red balls and 5 blue balls.", "5", NA),
    ("nb-same-line-retraction", "So the answer is 10. Hmm, wait, I need to recheck that.", "10", NA),
    ("nb-amc-option", r"Therefore, $\boxed{\textbf{(D)}\ 42}$", "D", OK),
    ("nb-subject-sentence", "Counting both rows.\nThe total number of apples is 15.", "15", OK),
    ("nb-subject-sentence-wrong", "Counting both rows.\nThe total number of apples is 16.", "15", NO),
    ("nb-planning-sentence", "We split the work.\nSo, let us check the 3 cases.", "3", NA),
    ("nb-truncated-sentence", "Adding the parts.\nTherefore, we get 3", "3", NA),
    ("nb-subject-no-value", "The number 5 is prime and 7 is too.", "7", NA),
    ("nb-hypothetical", "If the answer is 5, then the sum would be odd, so we look further", "5", NA),
    ("nb-check-whether", "Next we check whether 5 is the answer", "5", NA),
]

LONG = [
    ("long-100k-box", _LONG + r"So the answer is $\boxed{17}$.", "17", OK),
    ("long-100k-box-wrong", _LONG + r"So the answer is $\boxed{18}$.", "17", NO),
    ("long-1mb-box", _MB + r"Finally $\boxed{\frac{5}{7}}$.", r"\frac{5}{7}", OK),
    ("long-1mb-phrase", _MB + "\nFinal answer: 3", "3", OK),
    ("long-early-box-only", r"Guess: \boxed{4}. " + _LONG, "4", NA),  # outside the graded tail, no final answer
    ("long-straddling-box", _straddle("x^2 + 2x + 1"), "(x+1)^2", OK),
    ("long-straddling-box-wrong", _straddle("x^2 + 2x + 2"), "(x+1)^2", NO),
    ("long-intermediate-boxes", ("Step \\boxed{1} done.\n\n" + _PAD * 40 + "\n\n") * 30 + r"Total: \boxed{31}.",
     "31", OK),
    ("long-just-over-old-limit", _PAD * 870 + r"\boxed{2}", "2", OK),
    ("long-unclosed-final", _LONG + r"So we get \boxed{\frac{1}{2}", "1/2", NA),
    ("long-answer-then-retraction", _LONG + "Answer: 9\nHmm, wait, I made a mistake somewhere.", "9", NA),
]

UNICODE = [
    ("uni-lone-surrogates-before-box", "Result\udc80\udcff: \\boxed{4}", "4", OK),
    ("uni-surrogate-in-answer", "So \\boxed{4\udc80}", "4", NO),
    ("uni-escaped-utf8-half", "Caf\udcc3\udca9 math: \\boxed{\udcc2\udcbd}", "1/2", OK),
    ("uni-high-surrogate-tail", "\\boxed{9} \ud800", "9", OK),
    ("uni-only-surrogates", "\udc80" * 50, "1", NA),
    ("uni-emoji", "Done 🎉 \\boxed{10} ✅", "10", OK),
    ("uni-rtl-marks", "\\boxed{\u200f42\u200e}", "42", OK),
    ("uni-fullwidth-fraction", "\\boxed{１/２}", "0.5", OK),
    ("uni-superscript-exponent", "\\boxed{2×10⁻⁵}", "0.00002", OK),
    ("uni-superscript-exponent-wrong", "\\boxed{2×10⁻⁴}", "0.00002", NO),
    ("uni-bom-and-zero-width", "\ufeff\\boxed{7\u2060}", "7", OK),
    ("uni-surrogate-gold", "\\boxed{3}", "3\udc80", NO),
    ("uni-replacement-char-wrong", "\\boxed{3\ufffd}", "3", NO),
]

NORMALIZATION = [
    # currency and thin-space thousands
    ("norm-currency-thinspace", B(r"\$1\,000"), "1000", OK),
    ("norm-currency-texcomma", B(r"\$1{,}250.50"), "1250.5", OK),
    ("norm-currency-space", B(r"\$ 12"), "12", OK),
    ("norm-currency-wrong", B(r"\$1\,000"), "100", NO),
    ("norm-negthinspace", B(r"1\!000"), "1000", OK),
    ("norm-euro", B("€15"), "15", OK),
    ("norm-decimal-comma-trap", B(r"\$2,50"), "2.5", NO),
    # formatting wrappers
    ("norm-textbf", B(r"\textbf{7}"), "7", OK),
    ("norm-mathbf-neg", B(r"\mathbf{-3}"), "-3", OK),
    ("norm-markdown-bold-in-box", B("**8**"), "8", OK),
    ("norm-text-number", B(r"\text{12}"), "12", OK),
    ("norm-textbf-wrong", B(r"\textbf{13}"), "12", NO),
    # units with exponents
    ("norm-unit-text-exp", B(r"5\text{ cm}^2"), "5", OK),
    ("norm-unit-mathrm-exp", B(r"5 \mathrm{m^2}"), "5", OK),
    ("norm-unit-text-braced-exp", B(r"12\,\text{cm}^{3}"), "12", OK),
    ("norm-unit-exp-wrong", B(r"5\text{ cm}^2"), "25", NO),
    ("norm-unit-speed", B(r"3\text{ m/s}"), "3", OK),
    ("norm-unit-gold", B("7"), r"7 \text{ km}", OK),
    # inequalities vs intervals
    ("norm-chain-open", B("2<x<5"), "(2,5)", OK),
    ("norm-ge-ray", B(r"x\ge 3"), r"[3,\infty)", OK),
    ("norm-ge-ray-wrong-bracket", B(r"x \geq 3"), r"(3,\infty)", NO),
    ("norm-chain-mixed", B(r"-1\le x<4"), "[-1,4)", OK),
    ("norm-union-or", B(r"x<-2 \text{ or } x>2"), r"(-\infty,-2)\cup(2,\infty)", OK),
    ("norm-interval-vs-closed-chain", B("(2,5)"), r"2 \le x \le 5", NO),
    ("norm-reversed-chain", B("5 > x > 2"), "(2,5)", OK),
    ("norm-frac-bound", B(r"x>\frac{1}{2}"), r"(\frac12,\infty)", OK),
    # the empty set
    ("norm-empty-varnothing", B(r"\emptyset"), r"\varnothing", OK),
    ("norm-empty-braces", B(r"\{\}"), r"\emptyset", OK),
    ("norm-empty-no-solution", B(r"\text{no solution}"), r"\emptyset", OK),
    ("norm-empty-none", B(r"\text{none}"), r"\emptyset", OK),
    ("norm-empty-vs-zero-set", B(r"\emptyset"), r"\{0\}", NO),
    ("norm-empty-no-real", B(r"\text{No real solutions}"), r"\varnothing", OK),
    ("norm-zero-vs-empty-gold", B("0"), r"\emptyset", NO),
    # solution sets written as equations joined by words
    ("norm-eq-and", B(r"x = 2 \text{ and } x = -3"), r"\{2,-3\}", OK),
    ("norm-eq-or", B(r"x=2 \text{ or } x=-3"), "-3, 2", OK),
    ("norm-eq-indexed", B("x_1 = 4, x_2 = -1"), r"\{-1,4\}", OK),
    ("norm-eq-wrong-sign", B(r"x=2 \text{ and } x=3"), r"\{2,-3\}", NO),
    ("norm-eq-system-not-set", B("x = 1, y = 2"), r"\{1,2\}", NO),
    ("norm-pm-gold-list", B("x = 3, x = -3"), r"\pm 3", OK),
    # number words
    ("norm-word-five", B(r"\text{five}"), "5", OK),
    ("norm-word-twelve", B("twelve"), "12", OK),
    ("norm-word-hyphen", B(r"\text{twenty-one}"), "21", OK),
    ("norm-word-wrong", B(r"\text{seven}"), "8", NO),
    ("norm-word-hundred", B(r"\text{one hundred}"), "100", OK),
    ("norm-word-gold", B("3"), r"\text{three}", OK),
    # function-call roots
    ("norm-sqrt-call", B(r"\sqrt(2)"), r"\sqrt{2}", OK),
    ("norm-sqrt-plain-call", B("sqrt(8)"), r"2\sqrt{2}", OK),
    ("norm-sqrt-coef-call", B("3sqrt(3)"), r"3\sqrt{3}", OK),
    ("norm-sqrt-call-wrong", B(r"\sqrt(3)"), r"\sqrt{2}", NO),
    ("norm-sqrt-call-nested", B("sqrt(2+sqrt(4))"), "2", OK),
    # power towers
    ("norm-tower-vs-int", B("2^{2^3}"), "256", OK),
    ("norm-tower-vs-power", B("2^{2^3}"), "2^8", OK),
    ("norm-tower-wrong", B("2^{2^3}"), "2^9", NO),
    ("norm-tower-three", B("3^{3^2}"), "19683", OK),
    ("norm-tower-not-assoc", B("2^{3^2}"), "(2^3)^2", NO),
    ("norm-power-of-power", B("(2^2)^3"), "64", OK),
    # huge integers vs power form
    ("norm-huge-power-vs-int", B("2^{100}"), "1267650600228229401496703205376", OK),
    ("norm-huge-int-vs-power", B("1267650600228229401496703205376"), "2^{100}", OK),
    ("norm-huge-off-by-one", B("1267650600228229401496703205377"), "2^{100}", NO),
    ("norm-huge-ten-power", B("10^{30}"), "1" + "0" * 30, OK),
    ("norm-huge-200", B("2^{200}"), str(2**200), OK),
    ("norm-huge-wrong-base", B("3^{100}"), str(2**100), NO),
    ("norm-huge-commas", B(f"{2**64:,}"), "2^{64}", OK),
    ("norm-huge-minus-one", B("2^{64}-1"), str(2**64 - 1), OK),
    ("norm-tower-beyond-budget", B("10^{10^{10}}"), "100^{5\\cdot 10^{9}}", OK),
    ("norm-tower-beyond-budget-wrong", B("10^{10^{10}}"), "10^{10^{10}}+1", NO),
    ("norm-set-builder", B(r"\{x \mid 2 < x < 5\}"), "(2,5)", OK),
    ("norm-unit-pi-area", B(r"28\pi \text{ cm}^2"), r"28\pi", OK),
    ("norm-word-fraction", B(r"\text{two thirds}"), r"\frac{2}{3}", OK),
    ("norm-word-with-unit", B(r"\text{five apples}"), "5", OK),
    ("norm-eq-spaced", B(r"x=1 \quad x=2"), "1, 2", OK),
    ("norm-eq-name-once", B(r"x = 2 \text{ or } -3"), r"\{-3,2\}", OK),
    ("norm-sqrt-index-call", B(r"\sqrt[3](8)"), "2", OK),
    ("norm-ineq-intersection", B(r"x>2 \text{ and } x<5"), "(2,5)", OK),
    ("norm-ineq-intersection-wrong", B(r"x>2 \text{ and } x\le 5"), "(2,5)", NO),
    ("norm-assignment-vs-singleton", B("x = 2"), r"\{2\}", OK),
    ("norm-factorial-vs-int", B("20!"), "2432902008176640000", OK),
    ("norm-word-half", B(r"\text{one half}"), "0.5", OK),
    ("norm-assignment-with-unit", B(r"x = 5 \text{ cm}"), "5", OK),
    ("norm-plus-infinity", B(r"x \ge 3"), r"[3, +\infty)", OK),
]

TOLERANCE = [
    ("tol-tiny-fractions", B(r"\frac{1}{10^{12}}"), r"\frac{2}{10^{12}}", NO),
    ("tol-tiny-powers", B("10^{-20}"), r"2\cdot 10^{-20}", NO),
    ("tol-tiny-sci-close", B(r"1\times10^{-9}"), r"1.0000001\times 10^{-9}", NO),
    ("tol-micro-decimals", B("0.000001"), "0.000002", NO),
    ("tol-tiny-pi", B(r"\frac{\pi}{10^{8}}"), r"\frac{2\pi}{10^{8}}", NO),
    ("tol-same-tiny-forms", B("10^{-20}"), r"\frac{1}{10^{20}}", OK),
    ("tol-zero-decimal-trap", B("0.000"), r"\frac{1}{3000}", NO),
    ("tol-pi-rounded", B("3.1416"), r"\pi", NO),
    ("tol-sci-vs-frac", B(r"1.5\times 10^{-12}"), r"\frac{3}{2\cdot 10^{12}}", OK),
    ("tol-tiny-roots", B(r"\sqrt{2}\cdot 10^{-10}"), r"\sqrt{3}\cdot 10^{-10}", NO),
    ("tol-huge-close", B("1000000000001"), "1000000000000", NO),
    ("tol-third-decimal", B("0.3333"), r"\frac{1}{3}", OK),
    ("tol-tiny-third-powers", B(r"\frac{1}{3^{40}}"), r"\frac{1}{3^{41}}", NO),
    ("tol-tiny-pi-third-powers", B(r"\frac{\pi}{3^{40}}"), r"\frac{\pi}{3^{41}}", NO),
    ("tol-same-pi-power-forms", B(r"\pi \cdot 10^{-9}"), r"\frac{\pi}{10^{9}}", OK),
    ("tol-sci-rounded-third", B(r"3.333\times 10^{-13}"), r"\frac{1}{3}\times 10^{-12}", OK),
]

HARD_CASES: list[tuple[str, str, str, str, str]] = [
    (cid, kind, r, g, e)
    for kind, table in (("several boxes", MULTI_BOX), ("no box", NO_BOX), ("long", LONG), ("invalid unicode", UNICODE),
                        ("normalization", NORMALIZATION), ("tolerance", TOLERANCE))
    for cid, r, g, e in table
]
