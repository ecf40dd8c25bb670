"""Text of typed documents for the synthetic scans: French (and English) lines up to 100 characters.

Word lists written for this project (common words, the vocabulary of letters, reports and
catalogues), with the punctuation, elisions (l’, d’), numbers, dates, capitalised titles and
references that typewritten pages carry. Deterministic given the `random.Random` passed in.
"""

from __future__ import annotations

import random

from data_tools.synth.wordlists import EN

FR = """
le la les un une des de du et à en au aux que qui ne pas plus pour par sur dans avec sans sous
entre vers chez contre depuis pendant avant après comme mais ou donc car si tout tous toute
toutes cette ces son sa ses leur leurs notre nos votre vos mon ma mes il elle ils elles nous
vous on je me se lui y dont où même aussi très bien déjà encore toujours jamais ici là alors
être avoir faire dire pouvoir aller voir savoir vouloir venir devoir prendre trouver donner
mettre parler passer croire rendre tenir porter demander rester connaître écrire reçu été fait
dit pris mis écrit envoyé adressé signé remis décidé prévu nommé chargé année mois jour semaine
heure temps fois moment date janvier février mars avril mai juin juillet août septembre octobre
novembre décembre lundi mardi mercredi jeudi vendredi samedi dimanche Monsieur Madame
Mademoiselle messieurs Directeur Président Ministre Préfet Secrétaire général maire conseil
comité commission service bureau administration ministère direction section société maison
ville pays région département commune rue place avenue boulevard Paris Lyon Marseille Bordeaux
Lille France français française Europe guerre paix armée soldat front lettre courrier note
rapport dossier pièce copie document texte page chapitre article numéro liste catalogue
registre enregistrement inventaire archives bibliothèque journal revue livre ouvrage auteur
éditeur édition titre disque bande chanson musique orchestre poème roman théâtre scène acte
prix franc francs somme montant compte facture paiement commande vente achat contrat accord
réponse demande question affaire projet travail travaux réunion séance ordre suite objet
référence veuillez agréer assurance considération distinguée salutations sentiments respectueux
cher chère ami amie famille père mère fils fille frère sœur enfant homme femme monde vie œuvre
nouveau nouvelle grand grande petit petite premier première dernier dernière seul seule autre
certain plusieurs chaque quelque ancien ancienne général générale public publique national
nationale officiel officielle important importante possible nécessaire présent présente
ci-joint ci-dessus ci-après c’est qu’il qu’elle n’est l’on d’un d’une l’année l’État l’article
à-dire celui celle ceux lesquels auquel également notamment cependant toutefois ainsi enfin
été élève école université étude études recherche science sciences histoire géographie
économie électricité équipe étranger étrangère événement évidemment île hôtel hôpital théâtre
fenêtre forêt château côté tâche âge mûr goût naïf Noël Hélène Émile Édouard André René
kilomètres kilos wagon week-end zone yeux Kafka Wagner Zola Kléber Watteau Yvonne
"""
FR_WORDS = FR.split()
EN_WORDS = EN
ELIDED = ("l’", "d’", "qu’", "n’", "s’", "c’", "j’", "L’", "D’")
VOWELS = "aeiouyéèêâîôûhAEIOUÉ"
PUNCT_AFTER = (",", ",", ",", ".", ";", ":", " :", " ;", " ?", " !", " ,", " .")  # typists spaced them
WRAPS = (("(", ")"), ('"', '"'), ("«", "»"), ("« ", " »"))
ITEM_MARKS = (".", ")", " -", "°")
HEADERS = ("Réf.", "Objet :", "N/Réf.", "P.J.", "Art.")
FILLER = "abcdefghijklmnopqrstuvwxyz"


def alphabet(lang: str = "fr") -> str:
    """Every character `typed_line` can write in `lang` (a tokenizer needs no other)."""
    words = FR_WORDS + list(ELIDED) if lang == "fr" else list(EN_WORDS)
    chars = set("".join(words)) | set("".join(words).upper()) | set("0123456789/,n° '") | set(FILLER)
    chars |= (
        set("".join(PUNCT_AFTER + ITEM_MARKS + HEADERS)) | set("".join(a + b for a, b in WRAPS)) | set("+=%")
    )
    return "".join(sorted(chars))


def _number(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return str(rng.randint(1, 999))
    if r < 0.55:
        return str(rng.randint(1880, 1990))
    if r < 0.7:
        return f"{rng.randint(1, 28)}/{rng.randint(1, 12):02d}/{rng.randint(1896, 1984)}"
    if r < 0.8:
        return f"n° {rng.randint(1, 9999)}"
    if r < 0.85:
        return f"{rng.randint(1, 99)},{rng.randint(0, 99):02d}"
    if r < 0.9:
        return f"{rng.choice(['', '+ ', '= '])}{rng.randint(1, 100)} %"
    return f"{rng.randint(1, 999)} {rng.randint(0, 999):03d}"


def _word(rng: random.Random, words: list[str], french: bool) -> str:
    r = rng.random()
    if r < 0.08:
        return _number(rng)
    w = rng.choice(words)
    if french and r < 0.14 and w[0] in VOWELS:
        elided = rng.choice(ELIDED[:6])
        w = (elided if rng.random() < 0.3 else elided.replace("’", "'")) + w  # typewriters have only '
    if r > 0.94:
        w = w.upper()
    elif r > 0.86:
        w = w[:1].upper() + w[1:]
    return w


def typed_line(rng: random.Random, min_chars: int, max_chars: int, lang: str = "fr") -> str:
    """A line of min_chars..max_chars characters: words with punctuation, numbers, dates; some
    lines are titles in capitals, references (`Réf. 12/B`) or numbered items."""
    words = FR_WORDS if lang == "fr" else EN_WORDS
    target = rng.randint(min_chars, max_chars)
    parts: list[str] = []
    kind = rng.random()
    if kind < 0.06:
        parts.append(f"{rng.randint(1, 40)}{rng.choice(ITEM_MARKS)}")
    elif kind < 0.09:
        parts.append(rng.choice(HEADERS))
    text = " ".join(parts)
    for _ in range(200):
        word = _word(rng, words, lang == "fr")
        if rng.random() < 0.1:
            word += rng.choice(PUNCT_AFTER)
        elif rng.random() < 0.05:
            left, right = rng.choice(WRAPS)
            word = f"{left}{word}{right}"
        candidate = f"{text} {word}" if text else word
        if len(candidate) > max_chars:
            break
        text = candidate
        if len(text) >= target:
            break
    if not text:  # the first word alone is longer than max_chars
        text = _word(rng, words, lang == "fr")[:max_chars]
    if kind > 0.94:
        text = text.upper()
    if len(text) < min_chars:
        text = (text + " " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(max_chars)))[
            :min_chars
        ]
    return text.strip() or "a"
